// Maxout: the max over the last axis of z (n_out, pieces) with its index, and
// the backward that routes dy to the winning piece. The argmax is
// host-callable (NNA_HD).
#include "activations.cuh"

namespace nna {

// NumPy's argmax: the first index of the maximum, a NaN counting as the
// maximum (so the max is NaN too, as numpy.max gives).
template <typename T> NNA_HD inline int maxout_argmax(const T* row, int pieces) {
  int best = 0;
  T best_value = row[0];
  for (int k = 1; k < pieces; ++k) {
    const T v = row[k];
    if (v > best_value || (v != v && best_value == best_value)) {
      best = k;
      best_value = v;
    }
  }
  return best;
}

}  // namespace nna

#ifdef __CUDACC__
template <typename T>
__global__ void maxout_forward(const T* z, T* y, int* idx, long long n_out, int pieces) {
  for (long long k = nna::grid_start(); k < n_out; k += nna::grid_stride()) {
    const T* row = z + k * pieces;
    const int best = nna::maxout_argmax(row, pieces);
    idx[k] = best;
    y[k] = row[best];
  }
}

// dz[k, j] = j == idx[k] ? dy[k] : 0, one thread per element of dz.
template <typename T>
__global__ void maxout_backward(const T* dy, const int* idx, T* dz, long long n_out, int pieces) {
  const long long n = n_out * pieces;
  for (nna::RowColWalk w(pieces); w.i < n; w.next()) dz[w.i] = idx[w.row] == w.col ? dy[w.row] : T(0);
}
#endif  // __CUDACC__
