"""The CUDA emulator (tests/cuda_standin) catches what a GPU would get wrong.

Each test launches a small kernel through the CuPy stand-in and checks that
a correct kernel gives the right answer and a kernel with a planted GPU bug
(a missing or divergent barrier, a shuffle reached by part of its mask, a
launch beyond the hardware limits, an argument of the wrong C type or
alignment, a read or write outside an allocation) fails loudly, saying where.
"""

import os
import subprocess
import sys

import numpy
import pytest

from emulated_cuda import ENV, STANDIN

pytestmark = pytest.mark.usefixtures("emulated")


@pytest.fixture
def cp():
    import cupy

    return cupy


def kernel(cp, source, name, expressions=None):
    module = cp.RawModule(code=source, options=("-std=c++17",), name_expressions=expressions or [])
    return module.get_function(name)


def launch_error(cp):
    return pytest.raises(cp.cuda.driver.CUDADriverError)


# ----- threads run concurrently up to each barrier, in an order that changes --------------------------
ORDER = r"""
extern "C" __global__ void order(int* counter, int* seen) {
  seen[atomicAdd(counter, 1)] = threadIdx.x;
}
"""


def test_threads_run_in_an_order_that_changes_from_launch_to_launch(cp):
    run = kernel(cp, ORDER, "order")
    orders = []
    for _ in range(3):
        counter, seen = cp.zeros(1, numpy.int32), cp.full(256, -1, numpy.int32)
        run((1,), (256,), (counter, seen))
        orders.append(seen.get())
    for order in orders:
        assert sorted(order) == list(range(256)), "every thread runs exactly once"
        assert list(order) != list(range(256)), "threads ran in index order"
    assert not numpy.array_equal(orders[0], orders[1]) and not numpy.array_equal(orders[1], orders[2])


def test_the_seed_repeats_the_schedules(tmp_path):
    script = ("import numpy, cupy; k = cupy.RawModule(code=open('order.cu').read()).get_function('order'); "
              "c, s = cupy.zeros(1, numpy.int32), cupy.zeros(64, numpy.int32); k((1,), (64,), (c, s)); "
              "print(s.get().tolist())")
    (tmp_path / "order.cu").write_text(ORDER)

    def order(seed):
        run = subprocess.run([sys.executable, "-c", script], env={**ENV, "CUDA_EMULATOR_SEED": str(seed)},
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        return run.stdout

    assert order(7) == order(7)
    assert order(7) != order(8)


NEIGHBOUR = r"""
extern "C" __global__ void neighbour(const float* x, float* y, int barrier) {
  __shared__ float s[256];
  s[threadIdx.x] = x[blockIdx.x * 256 + threadIdx.x];
  if (barrier) __syncthreads();
  y[blockIdx.x * 256 + threadIdx.x] = s[(threadIdx.x + 1) % 256];
}
"""


def test_a_missing_barrier_reads_what_is_not_written_yet(cp):
    run = kernel(cp, NEIGHBOUR, "neighbour")
    x = cp.asarray(numpy.arange(4 * 256, dtype=numpy.float32))
    expected = numpy.roll(numpy.arange(4 * 256, dtype=numpy.float32).reshape(4, 256), -1, axis=1).ravel()
    y = cp.empty_like(x)
    run((4,), (256,), (x, y, numpy.int32(1)))
    numpy.testing.assert_array_equal(y.get(), expected)
    run((4,), (256,), (x, y, numpy.int32(0)))
    assert not numpy.array_equal(y.get(), expected), "without the barrier some thread read its neighbour's " \
                                                     "slot before the neighbour wrote it"


def test_shared_memory_starts_as_garbage(cp):
    source = r"""
    extern "C" __global__ void peek(unsigned* out) {
      __shared__ unsigned s[64];
      if (threadIdx.x < 8) s[threadIdx.x] = 0;  // the rest is never written
      __syncthreads();
      out[blockIdx.x * 64 + threadIdx.x] = s[threadIdx.x];
    }"""
    out = cp.zeros(4 * 64, numpy.uint32)
    kernel(cp, source, "peek")((4,), (64,), (out,))
    values = out.get().reshape(4, 64)
    assert not values[:, :8].any() and (values[:, 8:] != 0).mean() > 0.9, "shared memory looked initialised"
    assert not numpy.array_equal(values[0], values[1]), "every block saw the same shared memory"


def test_shared_memory_a_kernel_never_writes_is_garbage_too(cp):
    """The host compiler must not read a static array nothing writes as its zeros."""
    source = r"""
    extern "C" __global__ void peek(unsigned* out) {
      __shared__ unsigned s[64];
      out[threadIdx.x] = s[threadIdx.x];
    }"""
    out = cp.zeros(64, numpy.uint32)
    kernel(cp, source, "peek")((1,), (64,), (out,))
    assert (out.get() != 0).mean() > 0.9, "shared memory looked initialised"


# ----- barriers reached by part of the block -------------------------------------------------------------
def test_a_barrier_after_an_early_return_is_an_error(cp):
    source = r"""
    extern "C" __global__ void early(float* y, int n) {
      if (threadIdx.x >= n) return;
      __syncthreads();
      y[threadIdx.x] = 1.0f;
    }"""
    run = kernel(cp, source, "early")
    y = cp.zeros(128, numpy.float32)
    run((1,), (128,), (y, numpy.int32(128)))  # every thread reaches it: fine
    with launch_error(cp) as error:
        run((1,), (128,), (y, numpy.int32(100)))
    assert "__syncthreads at kernel.cu:4 was reached by 100 of the block's 128 threads" in str(error.value)


def test_threads_at_different_barriers_are_an_error(cp):
    source = r"""
    extern "C" __global__ void split(float* y) {
      if (threadIdx.x % 2) {
        __syncthreads();
      } else {
        __syncthreads();
      }
      y[threadIdx.x] = 1.0f;
    }"""
    with launch_error(cp) as error:
        kernel(cp, source, "split")((1,), (64,), (cp.zeros(64, numpy.float32),))
    assert "wait at different barriers" in str(error.value) and "kernel.cu:4" in str(error.value)


def test_barrier_reductions(cp):
    source = r"""
    extern "C" __global__ void vote(int* out) {
      const int odd = threadIdx.x % 2;
      out[0] = __syncthreads_count(odd);
      out[1] = __syncthreads_and(odd);
      out[2] = __syncthreads_or(odd);
    }"""
    out = cp.full(3, -1, numpy.int32)
    kernel(cp, source, "vote")((1,), (96,), (out,))
    assert out.get().tolist() == [48, 0, 1]


# ----- warp collectives --------------------------------------------------------------------------------
SHUFFLES = r"""
extern "C" __global__ void shuffles(const int* arg, int* out, int width) {
  const int v = 100 + threadIdx.x;
  const int a = arg[threadIdx.x];
  out[0 * 64 + threadIdx.x] = __shfl_sync(0xffffffffu, v, a, width);
  out[1 * 64 + threadIdx.x] = __shfl_up_sync(0xffffffffu, v, 3, width);
  out[2 * 64 + threadIdx.x] = __shfl_down_sync(0xffffffffu, v, 3, width);
  out[3 * 64 + threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 5, width);
  out[4 * 64 + threadIdx.x] = __ballot_sync(0xffffffffu, threadIdx.x % 3 == 0);
  out[5 * 64 + threadIdx.x] = __reduce_add_sync(0xffffffffu, (int)threadIdx.x);
}
"""


@pytest.mark.parametrize("width", [32, 16, 4])
def test_shuffles_follow_cudas_lane_rules(cp, width):
    arg = numpy.random.default_rng(width).integers(-40, 40, 64).astype(numpy.int32)
    out = cp.zeros(6 * 64, numpy.int32)
    kernel(cp, SHUFFLES, "shuffles")((1,), (64,), (cp.asarray(arg), out, numpy.int32(width)))
    idx, up, down, xor, ballot, total = out.get().reshape(6, 64)
    for t in range(64):
        lane, warp = t % 32, t // 32
        base = lane - lane % width
        assert idx[t] == 100 + 32 * warp + base + arg[t] % width
        assert up[t] == 100 + t - (3 if lane - 3 >= base else 0)
        assert down[t] == 100 + t + (3 if lane + 3 < base + width else 0)
        assert xor[t] == 100 + t + ((lane ^ 5) - lane if (lane ^ 5) < base + width else 0)
        assert ballot[t] == numpy.int32(numpy.uint32(sum(1 << k for k in range(32) if (32 * warp + k) % 3 == 0)))
        assert total[t] == sum(range(32 * warp, 32 * warp + 32))


def test_a_partial_mask_is_a_subgroup(cp):
    source = r"""
    extern "C" __global__ void half(int* out) {
      int v = threadIdx.x;
      if (threadIdx.x < 16)
        for (int o = 8; o > 0; o /= 2) v += __shfl_xor_sync(0x0000ffffu, v, o);
      out[threadIdx.x] = v;
    }"""
    out = cp.zeros(32, numpy.int32)
    kernel(cp, source, "half")((1,), (32,), (out,))
    assert out.get().tolist() == [120] * 16 + list(range(16, 32))


@pytest.mark.parametrize("condition", ["threadIdx.x < 16", "threadIdx.x != 5"])
def test_a_full_mask_shuffle_reached_by_part_of_the_warp_is_an_error(cp, condition):
    """Whichever comes first, a lane leaving without it or the lanes waiting for the rest, it is an error."""
    source = rf"""
    extern "C" __global__ void partial(int* out) {{
      int v = threadIdx.x;
      if ({condition}) v = __shfl_xor_sync(0xffffffffu, v, 1);
      out[threadIdx.x] = v;
    }}"""
    with launch_error(cp) as error:
        kernel(cp, source, "partial")((1,), (32,), (cp.zeros(32, numpy.int32),))
    assert "__shfl_xor_sync at kernel.cu:4" in str(error.value) and "mask 0xffffffff" in str(error.value)


@pytest.mark.parametrize("body, message", [
    ("v = __shfl_sync(0x1u, v, 0);", "leaves the lane itself out"),
    ("v = threadIdx.x % 2 ? __shfl_xor_sync(0xffffffffu, v, 1) : __shfl_down_sync(0xffffffffu, v, 1);",
     "disagree"),
    ("v = __shfl_sync(0xffffffffu, v, 0, 3);", "width 3 is not a power of 2"),
    ("__syncwarp(); if (threadIdx.x == 0) __syncwarp(0x1u); else __syncthreads();",
     "was reached by 31 of the block's 32 threads"),
    ("if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1); else __syncthreads();", "__syncthreads"),
])
def test_collective_misuse_is_an_error(cp, body, message):
    source = f'extern "C" __global__ void misuse(int* out) {{ int v = threadIdx.x; {body} out[threadIdx.x] = v; }}'
    with launch_error(cp) as error:
        kernel(cp, source, "misuse")((1,), (32,), (cp.zeros(32, numpy.int32),))
    assert message in str(error.value)


def test_a_full_mask_in_a_partial_warp_is_an_error(cp):
    source = r"""
    extern "C" __global__ void tail(float* x) {
      float v = x[threadIdx.x];
      for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
      x[threadIdx.x] = v;
    }"""
    run = kernel(cp, source, "tail")
    run((1,), (64,), (cp.ones(64, numpy.float32),))
    with launch_error(cp) as error:
        run((1,), (40,), (cp.ones(64, numpy.float32),))
    assert "names lanes that do not exist: warp 1 of this 40-thread block has lanes 0x000000ff" in str(error.value)


def test_atomics(cp):
    source = r"""
    extern "C" __global__ void atomics(float* f, int* i, unsigned long long* u) {
      atomicAdd(f, 0.5f);
      atomicAdd(i, 1);
      atomicMax(i + 1, (int)(blockIdx.x * blockDim.x + threadIdx.x));
      atomicCAS(u, 0ull, 42ull + threadIdx.x);
    }"""
    f, i, u = cp.zeros(1, numpy.float32), cp.zeros(2, numpy.int32), cp.zeros(1, numpy.uint64)
    kernel(cp, source, "atomics")((3,), (100,), (f, i, u))
    assert float(f[0]) == 150.0 and i.get().tolist() == [300, 299] and 42 <= int(u[0]) < 142


# ----- launches a GPU refuses ------------------------------------------------------------------------------
TOUCH = 'extern "C" __global__ void touch(int* p) { p[0] = 1; }'


@pytest.mark.parametrize("grid, block, message", [
    ((0,), (32,), "grid (0, 1, 1) has no blocks"),
    ((1,), (0,), "block (0, 1, 1) has no threads"),
    ((1,), (1025,), "blockDim.x = 1025 exceeds the limit 1024"),
    ((1,), (32, 33), "has 1056 threads, more than 1024"),
    ((1,), (1, 1, 65), "blockDim.z = 65 exceeds the limit 64"),
    ((1, 65536), (32,), "gridDim.y = 65536 exceeds the limit 65535"),
    ((2**31,), (32,), "gridDim.x = 2147483648 exceeds the limit 2147483647"),
])
def test_launch_limits(cp, grid, block, message):
    with launch_error(cp) as error:
        kernel(cp, TOUCH, "touch")(grid, block, (cp.zeros(1, numpy.int32),))
    assert "CUDA_ERROR_INVALID_VALUE" in str(error.value) and message in str(error.value)


def test_too_much_static_shared_memory_does_not_compile(cp):
    source = ('extern "C" __global__ void big(float* y) { __shared__ float s[12289]; s[threadIdx.x] = 1; '
              '__syncthreads(); y[threadIdx.x] = s[threadIdx.x + 1]; }')
    with pytest.raises(cp.cuda.compiler.CompileException, match="49156 bytes of static shared memory"):
        kernel(cp, source, "big")


def test_too_much_static_shared_memory_that_is_never_used_does_not_compile_either(cp):
    source = 'extern "C" __global__ void big(float* y) { __shared__ float s[12289]; y[threadIdx.x] = 1; }'
    with pytest.raises(cp.cuda.compiler.CompileException, match="49156 bytes of static shared memory"):
        kernel(cp, source, "big")


def test_too_much_static_shared_memory_in_a_device_function_does_not_compile_either(cp):
    """ptxas counts the arrays of the device functions a kernel calls against its 48 KiB."""
    source = ('__device__ float stage(float v) { __shared__ float s[12289]; s[threadIdx.x] = v; __syncthreads(); '
              'return s[threadIdx.x]; }\n'
              'extern "C" __global__ void big(float* y) { y[threadIdx.x] = stage(1); }')
    with pytest.raises(cp.cuda.compiler.CompileException, match="49156 bytes of static shared memory"):
        kernel(cp, source, "big")


def test_a_kernel_that_does_not_compile_says_why(cp):
    with pytest.raises(cp.cuda.compiler.CompileException, match="undeclared|was not declared"):
        kernel(cp, 'extern "C" __global__ void bad(float* y) { y[0] = undefined_thing; }', "bad")


SCALE = r"""
template <typename T>
__global__ void scale(const T* x, T* y, long long n, double factor) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = x[i] * T(factor);
}
"""


@pytest.mark.parametrize("make_args, message", [
    (lambda cp, x, y: (x, y, numpy.int32(10), 2.0), "argument 2 (long long n) got int32 10, 4 bytes of int32 for a "
                                                    "8-byte long long"),
    (lambda cp, x, y: (x, y, 10, numpy.float32(2.0)), "argument 3 (double factor) got float32"),
    (lambda cp, x, y: (x, y, 10.0, 2.0), "argument 2 (long long n) got float64"),
    (lambda cp, x, y: (x.astype(numpy.float64), y, 10, 2.0), "argument 0 (const float* x) got a float64 array"),
    (lambda cp, x, y: (x, y, 10), "takes 4 arguments, got 3"),
    (lambda cp, x, y: (x, 10, 10, 2.0), "argument 1 (float* y) is a pointer, got int64 10"),
    (lambda cp, x, y: (x, y, x, 2.0), "argument 2 (long long n) is a value, got a float32 array"),
])
def test_arguments_must_match_the_parameter_types(cp, make_args, message):
    run = kernel(cp, SCALE, "scale<float>", ["scale<float>"])
    x, y = cp.arange(10, dtype=numpy.float32), cp.zeros(10, numpy.float32)
    run((1,), (32,), (x, y, 10, 2.0))  # Python int: long long, float: double, as CuPy passes them
    numpy.testing.assert_array_equal(y.get(), 2 * numpy.arange(10))
    with launch_error(cp) as error:
        run((1,), (32,), make_args(cp, x, y))
    assert message in str(error.value)


def test_a_pointer_misaligned_for_its_type_is_an_error(cp):
    """A float64 view carved 4 bytes into a float32 buffer: x86 reads it unaligned, but on a GPU (allocations
    256-byte aligned) every access through it is misaligned, a fault; views at whole elements are fine."""
    run = kernel(cp, SCALE, "scale<double>", ["scale<double>"])
    buffer, y = cp.arange(10, dtype=numpy.float32), cp.zeros(4, numpy.float64)
    run((1,), (32,), (buffer[2:10].view(numpy.float64), y, 4, 2.0))  # 8 bytes in: aligned
    with launch_error(cp) as error:
        run((1,), (32,), (buffer[1:9].view(numpy.float64), y, 4, 2.0))
    assert "CUDA_ERROR_MISALIGNED_ADDRESS" in str(error.value)
    assert "argument 0 (const double* x) got a float64 array of shape (4,) starting 4 bytes into its allocation, " \
           "not a multiple of the 8-byte alignment of double" in str(error.value)


NULLABLE = r"""
extern "C" __global__ void nullable(const float* x, float* y) { y[threadIdx.x] = x ? x[threadIdx.x] : -1.0f; }
"""


def test_a_null_pointer_is_an_8_byte_zero_and_none_is_refused(cp):
    """CUDA copies an argument's bytes: an 8-byte integer 0 is a null pointer (nonzero is refused above).
    None is refused as CuPy 13 mishandles it (cupy#9046: the kernel reads a garbage pointer)."""
    run = kernel(cp, NULLABLE, "nullable")
    x, y = cp.arange(4, dtype=numpy.float32), cp.zeros(4, numpy.float32)
    run((1,), (4,), (x, y))
    numpy.testing.assert_array_equal(y.get(), numpy.arange(4))
    for null in (numpy.uint64(0), 0):
        y.fill(0)
        run((1,), (4,), (null, y))
        numpy.testing.assert_array_equal(y.get(), -numpy.ones(4))
    with pytest.raises(TypeError, match=r"argument 0: None, which CuPy 13 passes as a garbage pointer \(cupy#9046\)"):
        run((1,), (4,), (None, y))
    with launch_error(cp) as error:
        run((1,), (4,), (numpy.uint32(0), y))
    assert "argument 0 (const float* x) is a pointer, got uint32 0" in str(error.value)


def test_host_arrays_are_not_kernel_arguments(cp):
    run = kernel(cp, SCALE, "scale<float>", ["scale<float>"])
    with pytest.raises(TypeError, match="host array"):
        run((1,), (32,), (numpy.zeros(10, numpy.float32), cp.zeros(10, numpy.float32), 10, 2.0))


# ----- memory outside an allocation -------------------------------------------------------------------------
OUT_OF_BOUNDS = r"""
extern "C" __global__ void copy(const float* x, float* y, long long n, long long shift) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i + shift] = x[i];
}
"""


@pytest.mark.parametrize("n, shift, message", [
    (101, 0, "read byte 400 of argument 0 (x: a float32 array of shape (100,), 400 bytes): past its end"),
    (100, 1, "wrote byte 400 of argument 1 (y: a float32 array of shape (100,), 400 bytes): past its end"),
    (100, 100000, "of argument 1 (y: a float32 array of shape (100,), 400 bytes): past its end"),
    (100, -1, "wrote before the start of argument 1 (y"),
])
def test_reads_and_writes_outside_an_allocation_are_errors(cp, n, shift, message):
    run = kernel(cp, OUT_OF_BOUNDS, "copy")
    x, y = cp.arange(100, dtype=numpy.float32), cp.zeros(100, numpy.float32)
    run((2,), (64,), (x, y, 100, 0))
    with launch_error(cp) as error:
        run((2,), (64,), (x, y, n, shift))
    assert "CUDA_ERROR_ILLEGAL_ADDRESS" in str(error.value) and message in str(error.value)
    run((2,), (64,), (x, y, 100, 0))  # the process and the emulator carry on
    numpy.testing.assert_array_equal(y.get(), numpy.arange(100))


def test_a_null_pointer_is_an_error(cp):
    with launch_error(cp) as error:
        kernel(cp, TOUCH, "touch")((1,), (1,), (numpy.uint64(0),))
    assert "wrote address 0x0, a null pointer" in str(error.value)


def test_writing_past_a_shared_array_is_an_error(cp):
    source = r"""
    extern "C" __global__ void spill(float* y) {
      __shared__ float s[64];
      s[threadIdx.x] = 1.0f;
      __syncthreads();
      y[threadIdx.x] = s[threadIdx.x];
    }"""
    run = kernel(cp, source, "spill")
    run((1,), (64,), (cp.zeros(80, numpy.float32),))
    with launch_error(cp) as error:
        run((1,), (80,), (cp.zeros(80, numpy.float32),))
    assert "wrote byte 256 of __shared__ s in spill, which has 256" in str(error.value)


def test_integer_division_by_zero_and_device_asserts_are_errors(cp):
    source = r"""
    extern "C" __global__ void divide(int* y, int d) { y[threadIdx.x] = 100 / d; }
    extern "C" __global__ void check(int* y) { assert(threadIdx.x < 16); y[threadIdx.x] = 1; }"""
    with launch_error(cp) as error:
        kernel(cp, source, "divide")((1,), (4,), (cp.zeros(4, numpy.int32), numpy.int32(0)))
    assert "SIGFPE" in str(error.value)
    with launch_error(cp) as error:
        kernel(cp, source, "check")((1,), (32,), (cp.zeros(32, numpy.int32),))
    assert "CUDA_ERROR_ASSERT" in str(error.value) and "threadIdx.x < 16" in str(error.value)


def test_an_endless_kernel_times_out(tmp_path):
    script = ("import numpy, cupy; k = cupy.RawModule(code='extern \"C\" __global__ void spin(volatile int* p) "
              "{ while (p[0] == 0) {} }').get_function('spin'); k((1,), (1,), (cupy.zeros(1, numpy.int32),))")
    run = subprocess.run([sys.executable, "-c", script], env={**ENV, "CUDA_EMULATOR_TIMEOUT": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "CUDA_ERROR_LAUNCH_TIMEOUT" in run.stderr and "ran longer than 1 s" in run.stderr


# ----- compilation -------------------------------------------------------------------------------------------
def test_compilation_is_cached_by_source_text(cp, monkeypatch, tmp_path):
    import cuda_emulator

    monkeypatch.setenv("CUDA_EMULATOR_CACHE", str(tmp_path))
    source = 'extern "C" __global__ void one(int* p) { p[0] = %d; }'
    before = cuda_emulator.stats["compiles"]
    out = cp.zeros(1, numpy.int32)
    kernel(cp, source % 1, "one")((1,), (1,), (out,))
    assert cuda_emulator.stats["compiles"] == before + 1
    kernel(cp, source % 1, "one")((1,), (1,), (out,))  # unchanged: loaded from the cache
    assert cuda_emulator.stats["compiles"] == before + 1
    kernel(cp, source % 2, "one")((1,), (1,), (out,))  # edited: compiled again
    assert cuda_emulator.stats["compiles"] == before + 2 and int(out[0]) == 2


@pytest.mark.parametrize("option", ["--std=c++14", "-std=c++11", "-std=c++03", "--std=gnu++14"])
def test_an_older_standard_compiles_as_nvrtc_does(cp, option):
    """NVRTC takes a C++14 kernel; the emulator's own header needs C++17, so it compiles at least that."""
    module = cp.RawModule(code='extern "C" __global__ void one(int* p) { p[0] = 1; }', options=(option,))
    out = cp.zeros(1, numpy.int32)
    module.get_function("one")((1,), (1,), (out,))
    assert int(out[0]) == 1


def test_a_newer_standard_is_kept(cp):
    source = ('consteval int twice(int x) { return 2 * x; }\n'
              'extern "C" __global__ void two(int* p) { p[0] = twice(1); }')  # consteval: C++20
    out = cp.zeros(1, numpy.int32)
    cp.RawModule(code=source, options=("--std=c++20",)).get_function("two")((1,), (1,), (out,))
    assert int(out[0]) == 2
    with pytest.raises(cp.cuda.compiler.CompileException, match="consteval"):
        cp.RawModule(code=source, options=("-std=c++17",)).get_function("two")


def test_the_portable_fiber_switch_runs_the_same_kernels(tmp_path):
    """Where there is no hand-written switch (not x86-64), threads switch with ucontext; forced here."""
    script = ("import numpy, cupy, cuda_emulator; k = cupy.RawModule(code=open('n.cu').read()).get_function("
              "'neighbour'); x = cupy.arange(512, dtype=numpy.float32); y = cupy.empty_like(x); "
              "k((2,), (256,), (x, y, numpy.int32(1))); "
              "assert (y.get() == numpy.roll(numpy.arange(512.).reshape(2, 256), -1, 1).ravel()).all(); "
              "print(cuda_emulator.runtime().path.name)")
    (tmp_path / "n.cu").write_text(NEIGHBOUR)
    run = subprocess.run([sys.executable, "-c", script], env={**ENV, "CUDA_EMULATOR_UCONTEXT": "1"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_the_stand_in_is_found_first_on_pythonpath():
    run = subprocess.run([sys.executable, "-c", "import cupy; print(cupy.__file__, cupy.__version__)"], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith(str(STANDIN)) and "standin" in run.stdout, run.stderr
    assert os.path.isdir(STANDIN / "cuda_emulator")
