// bfloat16 storage: values kept as the top 16 bits of a float32 (8 exponent,
// 7 mantissa bits) and computed in float. nna::load widens exactly;
// nna::store rounds to nearest, ties to even, as CUDA's __float2bfloat16 does
// (cuda_bf16.h): subnormals rounded too, overflow to infinity, and every NaN to
// the canonical 0x7fff (CUDART_NAN_BF16), whatever its sign and payload. Our own two-byte type rather than
// cuda_bf16.h, so the kernels need no CUDA header (NVRTC through CuPy, the CPU
// emulator); for float and double, load and store are the identity, so one
// template serves all three storage types.
#ifndef NNA_BFLOAT16_CUH
#define NNA_BFLOAT16_CUH

namespace nna {

struct bf16 {
  unsigned short bits;
};

// The type a stored value is computed in: float for bf16, the type itself otherwise.
template <typename S> struct ComputeOf { using type = S; };
template <> struct ComputeOf<bf16> { using type = float; };
template <typename S> using compute_t = typename ComputeOf<S>::type;

__device__ inline float load(bf16 v) { return __uint_as_float((unsigned)v.bits << 16); }
__device__ inline float load(float v) { return v; }
__device__ inline double load(double v) { return v; }

template <typename S> __device__ inline S store(compute_t<S> v) { return v; }
template <> __device__ inline bf16 store<bf16>(float v) {
  unsigned u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{0x7fffu};  // the canonical NaN, as __float2bfloat16 gives
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{(unsigned short)(u >> 16)};
}

}  // namespace nna

#endif  // NNA_BFLOAT16_CUH
