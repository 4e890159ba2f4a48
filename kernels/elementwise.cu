// Fused bias + activation, the activation backward (optionally fused with the
// bias gradient), the row softmax with its backward, and the conversions to
// and from bfloat16 storage. Templates on the float type, instantiated by the
// loader's name expressions (nnaccel/backend/cuda_kernels.py); all loops are
// grid-stride. The Dense layers' kernels template on the storage type S
// (float, double or nna::bf16) and compute in nna::compute_t<S>; the bias and
// the bias gradient are master parameters, kept in the compute type.
#include "activations.cuh"
#include "bfloat16.cuh"

// Block shape of act_backward_bias_grad: columns x row lanes (the loader
// launches (BG_COLS, BG_ROWS) threads).
constexpr int BG_COLS = 32;
constexpr int BG_ROWS = 8;

// out[i, j] = act(z[i, j] + bias[j]); bias may be null (no add); out may alias z, else z keeps
// z + bias (gelu and silu's derivatives read it), in the same launch, and out activates the sum as
// stored (rounded to bfloat16 storage), the value the derivative reads, as conv.cu's bias_act_to_nchw
// does (tests/test_bf16_storage.py pins each).
template <typename S>
__global__ void bias_act(S* z, const nna::compute_t<S>* bias, S* out, long long rows, long long cols,
                         int act, double param) {
  using T = nna::compute_t<S>;
  const T p = T(param);
  const long long n = rows * cols;
  for (nna::RowColWalk w(cols); w.i < n; w.next()) {
    T v = nna::load(z[w.i]);
    if (bias) {
      v += bias[w.col];
      if (out != z) {
        const S kept = nna::store<S>(v);
        z[w.i] = kept;
        v = nna::load(kept);
      }
    }
    out[w.i] = nna::store<S>(nna::act_forward(act, p, v));
  }
}

// dz = dy * act'(x), x being y or z as nna::act_grad_uses_z says (null for
// linear). dz may alias dy.
template <typename S>
__global__ void act_backward(const S* dy, const S* x, S* dz, long long n, int act, double param) {
  using T = nna::compute_t<S>;
  const T p = T(param);
  for (long long i = nna::grid_start(); i < n; i += nna::grid_stride())
    dz[i] = nna::store<S>(nna::load(dy[i]) * nna::act_derivative(act, p, x ? nna::load(x[i]) : T(0)));
}

// act_backward on a (rows, cols) array plus the column sums of dz. Block
// (bx, by) covers columns [32 bx, 32 bx + 32) of rows [by chunk_rows,
// (by + 1) chunk_rows) and writes its sums to partial[by, :]; bias_grad_reduce
// adds the chunks up in a fixed order, so the result is deterministic. With
// one chunk, partial is the bias gradient itself. The sums add dz as stored
// (rounded, for bf16), the values the weight gradient's GEMM reads.
template <typename S>
__global__ void act_backward_bias_grad(const S* dy, const S* x, S* dz, nna::compute_t<S>* partial,
                                       long long rows, long long cols, long long chunk_rows, int act,
                                       double param) {
  using T = nna::compute_t<S>;
  __shared__ T sums[BG_ROWS][BG_COLS];
  const T p = T(param);
  const long long col = blockIdx.x * (long long)BG_COLS + threadIdx.x;
  const long long first = blockIdx.y * chunk_rows;
  const long long end = first + chunk_rows < rows ? first + chunk_rows : rows;
  T acc = T(0);
  if (col < cols) {
    for (long long r = first + threadIdx.y; r < end; r += BG_ROWS) {
      const long long i = r * cols + col;
      const S d = nna::store<S>(nna::load(dy[i]) * nna::act_derivative(act, p, x ? nna::load(x[i]) : T(0)));
      dz[i] = d;
      acc += nna::load(d);
    }
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    for (int k = 1; k < BG_ROWS; ++k) acc += sums[k][threadIdx.x];
    partial[blockIdx.y * cols + col] = acc;
  }
}

// db[j] = sum over chunks k of partial[k, j], k in increasing order.
template <typename T>
__global__ void bias_grad_reduce(const T* partial, T* db, long long chunks, long long cols) {
  for (long long j = nna::grid_start(); j < cols; j += nna::grid_stride()) {
    T s = partial[j];
    for (long long k = 1; k < chunks; ++k) s += partial[k * cols + j];
    db[j] = s;
  }
}

// y = softmax of each row of z, one warp per row; y may alias z.
template <typename T>
__global__ void softmax_rows(const T* z, T* y, long long rows, long long cols) {
  for (long long r = nna::warp_row_start(); r < rows; r += nna::warp_row_stride()) {
    const T* zr = z + r * cols;
    T* yr = y + r * cols;
    T max, sum;
    nna::row_softmax_stats(zr, cols, max, sum);
    __syncwarp();  // every lane's reads of the row happen before any lane overwrites it (y may alias z)
    for (long long c = nna::lane_id(); c < cols; c += 32) yr[c] = nna::math::exp(zr[c] - max) / sum;
  }
}

// dz = y * (dy - sum_j dy_j y_j) per row, one warp per row; dz may alias dy.
template <typename T>
__global__ void softmax_backward(const T* dy, const T* y, T* dz, long long rows, long long cols) {
  for (long long r = nna::warp_row_start(); r < rows; r += nna::warp_row_stride()) {
    const T* dyr = dy + r * cols;
    const T* yr = y + r * cols;
    T* dzr = dz + r * cols;
    T inner = T(0);
    for (long long c = nna::lane_id(); c < cols; c += 32) inner += dyr[c] * yr[c];
    inner = nna::warp_sum(inner);
    for (long long c = nna::lane_id(); c < cols; c += 32) dzr[c] = yr[c] * (dyr[c] - inner);
  }
}

// y = x in storage type S (float to bf16: rounded to nearest, ties to even).
template <typename S>
__global__ void to_storage(const nna::compute_t<S>* x, S* y, long long n) {
  for (long long i = nna::grid_start(); i < n; i += nna::grid_stride()) y[i] = nna::store<S>(x[i]);
}

// y = x widened from storage type S to its compute type (exact).
template <typename S>
__global__ void from_storage(const S* x, nna::compute_t<S>* y, long long n) {
  for (long long i = nna::grid_start(); i < n; i += nna::grid_stride()) y[i] = nna::load(x[i]);
}
