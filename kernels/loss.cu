// Softmax cross-entropy over the rows of a logits array, fused with its
// gradient. The per-row formulas are host-callable
// (NNA_HD); the kernel needs a CUDA compiler.
#include "activations.cuh"

namespace nna {

// -log softmax(x)[label] from the row max m and s = sum exp(x - m), written
// as log(s) - (x[label] - m) like nnaccel's NumPy backend.
template <typename T> NNA_HD inline T ce_row_loss(T picked, T m, T s) { return math::log(s) - (picked - m); }

// (softmax(x) - onehot) * scale for one element.
template <typename T> NNA_HD inline T ce_grad(T x, T m, T s, bool is_label, T scale) {
  const T p = math::exp(x - m) / s;
  return (is_label ? p - T(1) : p) * scale;
}

}  // namespace nna

#ifdef __CUDACC__
// One warp per row. row_loss[i] = -log softmax(logits[i])[labels[i]];
// grad = (softmax - onehot) * inv_batch, which may alias logits. A label
// outside [0, cols) gives a NaN loss and a NaN gradient row.
template <typename T>
__global__ void softmax_cross_entropy(const T* logits, const long long* labels, T* grad, T* row_loss,
                                      long long rows, long long cols, double inv_batch) {
  const T scale = T(inv_batch);
  for (long long r = nna::warp_row_start(); r < rows; r += nna::warp_row_stride()) {
    const T* x = logits + r * cols;
    T* g = grad + r * cols;
    const long long label = labels[r];
    const bool valid = label >= 0 && label < cols;
    const T picked = valid ? x[label] : T(0);  // read before g overwrites it
    T max, sum;
    nna::row_softmax_stats(x, cols, max, sum);
    if (!valid) sum = nna::math::quiet_nan<T>();
    __syncwarp();  // every lane's reads of the row (picked included) happen before any lane overwrites it
    for (long long c = nna::lane_id(); c < cols; c += 32) g[c] = nna::ce_grad(x[c], max, sum, c == label, scale);
    if (nna::lane_id() == 0) row_loss[r] = nna::ce_row_loss(picked, max, sum);
  }
}
#endif  // __CUDACC__
