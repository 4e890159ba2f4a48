// CUDA's execution model for kernel source compiled by the host C++ compiler.
//
// Test infrastructure of nnaccel (tests/cuda_standin): the kernel text that
// CuPy would hand to NVRTC is compiled by g++ with this header in front of it
// and run by runtime.cpp, which gives every CUDA thread of a block its own
// stack and runs them concurrently up to each barrier, in a seeded random
// order. Built-in variables, barriers, warp collectives and atomics are
// declared here; each barrier and collective passes its source location so
// that a divergent one is reported where it is.
#ifndef CUDA_EMULATOR_H
#define CUDA_EMULATOR_H

#define __CUDACC__ 1
#define __CUDACC_RTC__ 1  // like NVRTC: the kernel text includes no host headers itself
#define __CUDA_ARCH__ 800

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
// Blocks run one after another, so one static copy of each shared array
// serves every block. The loader finds these arrays in the module's symbol
// table (device code has no other writable local statics); the runtime fills
// them with garbage before each block, as shared memory starts uninitialised
// on a GPU, and the rest of each one's page with a canary that a write past
// the array's end changes (checked after each block). ``used`` keeps the
// compiler from reading an array the kernel never writes as its zeros, or
// dropping it (and its size) from the symbol table.
#define __shared__ static __attribute__((aligned(4096), used))

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running CUDA thread, as the runtime shows it to kernel code.
struct cuemu_thread {
  uint3 idx;
};

extern "C" {
extern cuemu_thread* cuemu_self;
extern uint3 cuemu_block_idx;
extern dim3 cuemu_block_dim, cuemu_grid_dim;
void cuemu_syncthreads(const char* where);
int cuemu_syncthreads_op(int op, int predicate, const char* where);
unsigned long long cuemu_warp_op(int op, unsigned mask, unsigned long long value, int arg, int width,
                                 const char* where);
unsigned cuemu_active_mask(void);
void cuemu_fail(const char* where, const char* message) __attribute__((noreturn));
}

#define threadIdx (cuemu_self->idx)
#define blockIdx cuemu_block_idx
#define blockDim cuemu_block_dim
#define gridDim cuemu_grid_dim
#define warpSize 32

#define CUEMU_STR2(x) #x
#define CUEMU_STR(x) CUEMU_STR2(x)
#define CUEMU_WHERE __FILE__ ":" CUEMU_STR(__LINE__)

// ----- barriers --------------------------------------------------------------------------
enum { CUEMU_BAR_PLAIN, CUEMU_BAR_COUNT, CUEMU_BAR_AND, CUEMU_BAR_OR };
#define __syncthreads() cuemu_syncthreads("__syncthreads at " CUEMU_WHERE)
#define __syncthreads_count(p) cuemu_syncthreads_op(CUEMU_BAR_COUNT, (p) != 0, "__syncthreads_count at " CUEMU_WHERE)
#define __syncthreads_and(p) cuemu_syncthreads_op(CUEMU_BAR_AND, (p) != 0, "__syncthreads_and at " CUEMU_WHERE)
#define __syncthreads_or(p) cuemu_syncthreads_op(CUEMU_BAR_OR, (p) != 0, "__syncthreads_or at " CUEMU_WHERE)

// ----- warp collectives ------------------------------------------------------------------
enum {
  CUEMU_SYNCWARP,
  CUEMU_SHFL_IDX,
  CUEMU_SHFL_UP,
  CUEMU_SHFL_DOWN,
  CUEMU_SHFL_XOR,
  CUEMU_BALLOT,
  CUEMU_REDUCE_ADD,
  CUEMU_REDUCE_MIN,
  CUEMU_REDUCE_MAX,
};

namespace cuemu {
template <typename T> inline unsigned long long to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  unsigned long long bits = 0;
  memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T> inline T from_bits(unsigned long long bits) {
  T v;
  memcpy(&v, &bits, sizeof(T));
  return v;
}
template <typename T> inline T shfl(const char* where, int op, unsigned mask, T var, int arg, int width = 32) {
  return from_bits<T>(cuemu_warp_op(op, mask, to_bits(var), arg, width, where));
}
inline void syncwarp(const char* where, unsigned mask = 0xffffffffu) {
  cuemu_warp_op(CUEMU_SYNCWARP, mask, 0, 0, 32, where);
}
template <typename T> inline T reduce(const char* where, int op, unsigned mask, T value) {
  static_assert(sizeof(T) == 4, "__reduce_*_sync takes 32-bit integers");
  return (T)cuemu_warp_op(op, mask, (unsigned long long)(long long)value, (T)-1 < (T)0, 32, where);
}
}  // namespace cuemu

#define __syncwarp(...) cuemu::syncwarp("__syncwarp at " CUEMU_WHERE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(mask, ...) cuemu::shfl("__shfl_sync at " CUEMU_WHERE, CUEMU_SHFL_IDX, mask, __VA_ARGS__)
#define __shfl_up_sync(mask, ...) cuemu::shfl("__shfl_up_sync at " CUEMU_WHERE, CUEMU_SHFL_UP, mask, __VA_ARGS__)
#define __shfl_down_sync(mask, ...) cuemu::shfl("__shfl_down_sync at " CUEMU_WHERE, CUEMU_SHFL_DOWN, mask, __VA_ARGS__)
#define __shfl_xor_sync(mask, ...) cuemu::shfl("__shfl_xor_sync at " CUEMU_WHERE, CUEMU_SHFL_XOR, mask, __VA_ARGS__)
#define __ballot_sync(mask, p) ((unsigned)cuemu_warp_op(CUEMU_BALLOT, mask, (p) != 0, 0, 32, "__ballot_sync at " CUEMU_WHERE))
#define __any_sync(mask, p) (__ballot_sync(mask, p) != 0)
#define __all_sync(mask, p) (__ballot_sync(mask, p) == (unsigned)(mask))
#define __reduce_add_sync(mask, v) cuemu::reduce("__reduce_add_sync at " CUEMU_WHERE, CUEMU_REDUCE_ADD, mask, v)
#define __reduce_min_sync(mask, v) cuemu::reduce("__reduce_min_sync at " CUEMU_WHERE, CUEMU_REDUCE_MIN, mask, v)
#define __reduce_max_sync(mask, v) cuemu::reduce("__reduce_max_sync at " CUEMU_WHERE, CUEMU_REDUCE_MAX, mask, v)
#define __activemask() cuemu_active_mask()

// ----- atomics: the threads of a launch share one host thread and switch only at barriers
// and collectives, so a plain read-modify-write is atomic here. ------------------------------
template <typename T> inline T atomicAdd(T* address, T value) {
  T old = *address;
  *address = old + value;
  return old;
}
template <typename T> inline T atomicSub(T* address, T value) {
  T old = *address;
  *address = old - value;
  return old;
}
template <typename T> inline T atomicExch(T* address, T value) {
  T old = *address;
  *address = value;
  return old;
}
template <typename T> inline T atomicMax(T* address, T value) {
  T old = *address;
  *address = old < value ? value : old;
  return old;
}
template <typename T> inline T atomicMin(T* address, T value) {
  T old = *address;
  *address = value < old ? value : old;
  return old;
}
template <typename T> inline T atomicCAS(T* address, T compare, T value) {
  T old = *address;
  if (old == compare) *address = value;
  return old;
}
template <typename T> inline T atomicAnd(T* address, T value) {
  T old = *address;
  *address = old & value;
  return old;
}
template <typename T> inline T atomicOr(T* address, T value) {
  T old = *address;
  *address = old | value;
  return old;
}
template <typename T> inline T atomicXor(T* address, T value) {
  T old = *address;
  *address = old ^ value;
  return old;
}
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __trap() { cuemu_fail("__trap", "the kernel called __trap()"); }
#undef assert
#define assert(e) ((e) ? (void)0 : cuemu_fail(CUEMU_WHERE, "device-side assertion failed: " #e))
template <typename T> inline T __ldg(const T* p) { return *p; }

// ----- the device math library: libm's functions, CUDA's extras and intrinsics ------------------
#define CUEMU_MINMAX(T, name, op) \
  inline T name(T a, T b) { return a op b ? a : b; }
CUEMU_MINMAX(int, max, >)
CUEMU_MINMAX(int, min, <)
CUEMU_MINMAX(unsigned int, max, >)
CUEMU_MINMAX(unsigned int, min, <)
CUEMU_MINMAX(long long, max, >)
CUEMU_MINMAX(long long, min, <)
CUEMU_MINMAX(unsigned long long, max, >)
CUEMU_MINMAX(unsigned long long, min, <)
#undef CUEMU_MINMAX
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
inline float __int_as_float(int x) { return cuemu::from_bits<float>((unsigned)x); }
inline int __float_as_int(float x) { return (int)cuemu::to_bits(x); }
inline float __uint_as_float(unsigned x) { return cuemu::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return (unsigned)cuemu::to_bits(x); }
inline double __longlong_as_double(long long x) { return cuemu::from_bits<double>((unsigned long long)x); }
inline long long __double_as_longlong(double x) { return (long long)cuemu::to_bits(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

// ----- vector types ------------------------------------------------------------------------
#define CUEMU_VEC(T, name)                                                                       \
  struct alignas(2 * sizeof(T)) name##2 { T x, y; };                                               \
  struct alignas(4 * sizeof(T) > 16 ? 16 : 4 * sizeof(T)) name##4 { T x, y, z, w; };              \
  inline name##2 make_##name##2(T x, T y) { return name##2{x, y}; }                              \
  inline name##4 make_##name##4(T x, T y, T z, T w) { return name##4{x, y, z, w}; }
CUEMU_VEC(float, float)
CUEMU_VEC(double, double)
CUEMU_VEC(int, int)
CUEMU_VEC(unsigned int, uint)
#undef CUEMU_VEC

#endif  // CUDA_EMULATOR_H
