// Elementwise activation math shared by the CUDA kernels.
//
// Each formula is written exactly as in nnaccel/activations.py (same operation
// order, same constants), so a GPU result differs from NumPy only by the
// rounding of the math library. The header compiles with NVRTC (no standard
// headers there), nvcc and plain g++ (the CUDA emulator, tests/cuda_standin).
#ifndef NNA_ACTIVATIONS_CUH
#define NNA_ACTIVATIONS_CUH

#ifdef __CUDACC__
#define NNA_HD __host__ __device__
#else
#define NNA_HD
#endif

#ifndef __CUDACC_RTC__
#include <math.h>
#endif

namespace nna {

// Activation codes; must match nnaccel.activations (and ACT_CODES in
// nnaccel/backend/cuda_kernels.py). Softmax (9) is row-wise: softmax_rows.
enum Act : int {
  ACT_LINEAR = 0,
  ACT_RELU = 1,
  ACT_LEAKY_RELU = 2,
  ACT_ELU = 3,
  ACT_SIGMOID = 4,
  ACT_TANH = 5,
  ACT_SOFTPLUS = 6,
  ACT_GELU = 7,
  ACT_SILU = 8,
};

// The type's own libm function: float calls the f-suffixed one so float32
// math stays float32, as NumPy's float32 ufuncs do.
namespace math {
#define NNA_MATH_FN(name)                                          \
  NNA_HD inline float name(float x) { return ::name##f(x); }       \
  NNA_HD inline double name(double x) { return ::name(x); }
NNA_MATH_FN(exp)
NNA_MATH_FN(expm1)
NNA_MATH_FN(log)
NNA_MATH_FN(log1p)
NNA_MATH_FN(tanh)
NNA_MATH_FN(erf)
NNA_MATH_FN(sqrt)
NNA_MATH_FN(fabs)
#undef NNA_MATH_FN
template <typename T> NNA_HD inline T quiet_nan();
template <> NNA_HD inline float quiet_nan<float>() { return ::nanf(""); }
template <> NNA_HD inline double quiet_nan<double>() { return ::nan(""); }
}  // namespace math

// NumPy's maximum(z, 0): NaN propagates.
template <typename T> NNA_HD inline T relu(T z) { return z < T(0) ? T(0) : z; }
template <typename T> NNA_HD inline T relu_grad(T y) { return y > T(0) ? T(1) : T(0); }

// activations.py's where(z > 0, z, slope * z).
template <typename T> NNA_HD inline T leaky_relu(T z, T slope) { return z > T(0) ? z : slope * z; }
template <typename T> NNA_HD inline T leaky_relu_grad(T y, T slope) { return y > T(0) ? T(1) : slope; }

// max(z, 0) + alpha * expm1(min(z, 0)): one term is always exactly 0.
template <typename T> NNA_HD inline T elu(T z, T alpha) { return z > T(0) ? z : alpha * math::expm1(z); }
template <typename T> NNA_HD inline T elu_grad(T y, T alpha) { return y > T(0) ? T(1) : y + alpha; }

// Backend.sigmoid: 1 / (1 + e^-z) for z >= 0, e^z / (1 + e^z) below; e^-|z| never overflows.
template <typename T> NNA_HD inline T sigmoid(T z) {
  const T tail = math::exp(-math::fabs(z));
  return (z >= T(0) ? T(1) : tail) / (T(1) + tail);
}
template <typename T> NNA_HD inline T sigmoid_grad(T y) { return y * (T(1) - y); }

template <typename T> NNA_HD inline T tanh_act(T z) { return math::tanh(z); }
template <typename T> NNA_HD inline T tanh_grad(T y) { return T(1) - y * y; }

// log(1 + e^z) = max(z, 0) + log1p(e^-|z|); its derivative sigmoid(z) = 1 - e^-y.
template <typename T> NNA_HD inline T softplus(T z) {
  return relu(z) + math::log1p(math::exp(-math::fabs(z)));
}
template <typename T> NNA_HD inline T softplus_grad(T y) { return -math::expm1(-y); }

// Exact GELU: z * Phi(z), Phi(z) = 0.5 * (1 + erf(z / sqrt 2)). The constants
// are the doubles Python computes for 1/math.sqrt(2) and 1/math.sqrt(2*pi).
template <typename T> NNA_HD inline T gelu_cdf(T z) {
  return (math::erf(z * T(0.7071067811865475)) + T(1)) * T(0.5);
}
template <typename T> NNA_HD inline T gelu(T z) { return z * gelu_cdf(z); }
template <typename T> NNA_HD inline T gelu_grad(T z) {
  const T pdf = math::exp(z * z * T(-0.5)) * T(0.3989422804014327);
  return pdf * z + gelu_cdf(z);
}

template <typename T> NNA_HD inline T silu(T z) { return z * sigmoid(z); }
template <typename T> NNA_HD inline T silu_grad(T z) {
  const T s = sigmoid(z);
  return ((T(1) - s) * z + T(1)) * s;
}

// y = f(z) for an activation code; param is leaky_relu's slope or elu's alpha.
template <typename T> NNA_HD inline T act_forward(int act, T param, T z) {
  switch (act) {
    case ACT_RELU: return relu(z);
    case ACT_LEAKY_RELU: return leaky_relu(z, param);
    case ACT_ELU: return elu(z, param);
    case ACT_SIGMOID: return sigmoid(z);
    case ACT_TANH: return tanh_act(z);
    case ACT_SOFTPLUS: return softplus(z);
    case ACT_GELU: return gelu(z);
    case ACT_SILU: return silu(z);
    default: return z;  // linear
  }
}

// True when the derivative needs z; the others read the saved output y.
NNA_HD inline bool act_grad_uses_z(int act) { return act == ACT_GELU || act == ACT_SILU; }

// f'(.) from x, which is z where act_grad_uses_z(act) and y otherwise
// (ignored for linear); the backward pass multiplies dy by it.
template <typename T> NNA_HD inline T act_derivative(int act, T param, T x) {
  switch (act) {
    case ACT_RELU: return relu_grad(x);
    case ACT_LEAKY_RELU: return leaky_relu_grad(x, param);
    case ACT_ELU: return elu_grad(x, param);
    case ACT_SIGMOID: return sigmoid_grad(x);
    case ACT_TANH: return tanh_grad(x);
    case ACT_SOFTPLUS: return softplus_grad(x);
    case ACT_GELU: return gelu_grad(x);
    case ACT_SILU: return silu_grad(x);
    default: return T(1);  // linear
  }
}

}  // namespace nna

#ifdef __CUDACC__
// Device helpers shared by the kernel files.
namespace nna {

namespace math {
template <typename T> __device__ inline T infinity();
template <> __device__ inline float infinity<float>() { return __int_as_float(0x7f800000); }
template <> __device__ inline double infinity<double>() { return __longlong_as_double(0x7ff0000000000000LL); }
}  // namespace math

// Grid-stride loop bounds in 64-bit, so n may exceed 2^31.
__device__ inline long long grid_start() { return blockIdx.x * (long long)blockDim.x + threadIdx.x; }
__device__ inline long long grid_stride() { return (long long)gridDim.x * blockDim.x; }

// Grid-stride walk over a C-contiguous (rows, cols) array that keeps the row
// and column of element i up to date without a 64-bit division per element.
struct RowColWalk {
  long long i, row, col;
  long long cols, stride, row_step, col_step;
  __device__ explicit RowColWalk(long long cols_) : cols(cols_) {
    i = grid_start();
    row = i / cols;
    col = i - row * cols;
    stride = grid_stride();
    row_step = stride / cols;
    col_step = stride - row_step * cols;
  }
  __device__ void next() {
    i += stride;
    row += row_step;
    col += col_step;
    if (col >= cols) {
      col -= cols;
      ++row;
    }
  }
};

// One warp per row: the rows a warp visits, and its lane.
__device__ inline long long warp_row_start() { return blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32; }
__device__ inline long long warp_row_stride() { return (long long)gridDim.x * (blockDim.x / 32); }
__device__ inline int lane_id() { return threadIdx.x % 32; }

// Butterfly reductions: every lane ends with the result, in the same order on
// every run (deterministic).
template <typename T> __device__ inline T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
template <typename T> __device__ inline T warp_max(T v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Row max and sum of exp(x - max) of one row, by one warp. A NaN anywhere
// makes the sum NaN (as in NumPy), whatever the max picked.
template <typename T> __device__ inline void row_softmax_stats(const T* x, long long cols, T& max, T& sum) {
  T m = x[0];
  for (long long c = lane_id(); c < cols; c += 32) m = x[c] > m ? x[c] : m;
  m = warp_max(m);
  T s = T(0);
  for (long long c = lane_id(); c < cols; c += 32) s += math::exp(x[c] - m);
  max = m;
  sum = warp_sum(s);
}

}  // namespace nna
#endif  // __CUDACC__

#endif  // NNA_ACTIVATIONS_CUH
