"""Every kernel file compiles, for every dtype the loader instantiates.

nvcc builds PTX for sm_80 and sm_90, with the options CuPy gets, from a
translation unit that takes the address of each of the loader's name
expressions (so the templates are really instantiated, and a name expression
that matches no kernel fails); the kernels' own arithmetic has no fused
multiply-add; and ptxas assembles that PTX, as the driver does when CuPy
loads it (the shared-memory limit and register spills are checked there only).
Where an NVRTC library is installed (CuPy's runtime compiler, e.g. from
``pip install nvidia-cuda-nvrtc-cu12``), the exact source and options CuPy
gets are also compiled through it; no GPU is needed for either.
"""

import ctypes
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from nnaccel.backend import cuda_kernels

ARCHS = ("sm_80", "sm_90")
DTYPES = tuple(cuda_kernels.CTYPES)
# Files that call no math library function (libdevice's exp, erf and tanh use fused multiply-adds inside, as
# glibc's do): with --fmad=false their PTX has none.
ARITHMETIC_ONLY = ("optimizer.cu", "batchnorm.cu", "maxout.cu")


def _instantiation_unit(filename):
    expressions = [e for dtype in DTYPES for e in cuda_kernels.name_expressions(filename, dtype)]
    refs = ",\n  ".join(f"(void*)&{e}" for e in expressions)
    return f'#include "{filename}"\nvoid* nna_kernels[] = {{\n  {refs}\n}};\n', len(expressions)


def _nvcc_ptx(tmp_path, filename, arch):
    unit, expected = _instantiation_unit(filename)
    stem = f"{filename[:-3]}_{arch}"
    (tmp_path / f"{stem}.cu").write_text(unit)
    result = subprocess.run(
        ["nvcc", *cuda_kernels.OPTIONS, "-I", str(cuda_kernels.kernels_dir()), "--ptx", f"-arch={arch}",
         "-Werror", "all-warnings", f"{stem}.cu", "-o", f"{stem}.ptx"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    ptx = (tmp_path / f"{stem}.ptx").read_text() if result.returncode == 0 else ""
    return result, ptx, expected


def _ptxas(tmp_path, ptx_file, arch):
    """Assemble PTX as the driver does when CuPy loads it: what only ptxas finds (more than 48 KiB of
    static shared memory, register spills) fails here, not on the GPU."""
    return subprocess.run(["ptxas", f"-arch={arch}", "--warn-on-spills", "--warning-as-error", ptx_file, "-o",
                           "/dev/null"], cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(None in (shutil.which("nvcc"), shutil.which("ptxas")),
                    reason="nvcc or ptxas is not on PATH (CUDA toolkit not installed)")
def test_ptxas_refuses_a_kernel_a_gpu_cannot_load(tmp_path):
    (tmp_path / "big.ptx").write_text(subprocess.run(
        ["nvcc", "--ptx", "-arch=sm_80", "-x", "cu", "-", "-o", "-"], capture_output=True, text=True, timeout=300,
        input="__device__ float stage(float v) { __shared__ float s[12289]; s[threadIdx.x] = v; __syncthreads(); "
              "return s[threadIdx.x]; }\n"
              'extern "C" __global__ void big(float* y) { y[threadIdx.x] = stage(1); }').stdout)
    assembled = _ptxas(tmp_path, "big.ptx", "sm_80")
    assert assembled.returncode != 0 and "too much shared data" in assembled.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH (CUDA toolkit not installed)")
def test_every_kernel_compiles_with_nvcc(tmp_path):
    jobs = [(f, arch) for f in cuda_kernels.KERNELS for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: _nvcc_ptx(tmp_path, *job), jobs))
    for (filename, arch), (result, ptx, expected) in zip(jobs, results):
        assert result.returncode == 0, f"{filename} for {arch}:\n{result.stdout}{result.stderr}"
        entries = ptx.count(".entry ")
        assert entries == expected, f"{filename} for {arch}: {entries} kernels in the PTX, expected {expected}"
        assert ".local" not in ptx, f"{filename} for {arch} spills to local memory"
        assembled = _ptxas(tmp_path, f"{filename[:-3]}_{arch}.ptx", arch)
        assert assembled.returncode == 0, f"ptxas on {filename} for {arch}:\n{assembled.stdout}{assembled.stderr}"
        if filename in ARITHMETIC_ONLY:
            assert "fma.rn" not in ptx, f"{filename} for {arch} fuses multiply-adds: NumPy and the emulator round both"


def _load_nvrtc():
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        return ctypes.CDLL(load_nvidia_dynamic_lib("nvrtc").abs_path)
    except Exception:  # not installed: cuda-pathfinder missing or no libnvrtc found
        return None


def _nvrtc_compile(lib, code, options, expressions):
    """Compile with NVRTC as CuPy does; returns (ok, log, lowered names)."""
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"kern.cu", 0, None, None) == 0
    try:
        for expression in expressions:
            assert lib.nvrtcAddNameExpression(prog, expression.encode()) == 0
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        lowered = {}
        if status == 0:
            for expression in expressions:
                name = ctypes.c_char_p()
                assert lib.nvrtcGetLoweredName(prog, expression.encode(), ctypes.byref(name)) == 0
                lowered[expression] = name.value.decode()
        return status == 0, log.value.decode(errors="replace"), lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def test_every_kernel_compiles_with_nvrtc():
    lib = _load_nvrtc()
    if lib is None:
        pytest.skip("no NVRTC library found (pip install nvidia-cuda-nvrtc-cu12 to run this check)")
    # CuPy adds the architecture and --device-as-default-execution-space.
    options = cuda_kernels.OPTIONS + ("-arch=compute_80", "--device-as-default-execution-space")
    for filename in cuda_kernels.KERNELS:
        for dtype in DTYPES:
            expressions = cuda_kernels.name_expressions(filename, dtype)
            ok, log, lowered = _nvrtc_compile(lib, cuda_kernels.source(filename), options, expressions)
            assert ok, f"NVRTC failed on {filename} ({dtype}):\n{log}"
            assert not log.strip(), f"NVRTC warnings on {filename} ({dtype}):\n{log}"
            assert sorted(lowered) == sorted(expressions)
