"""The stand-in's cuBLAS (CuPy's ``cupy_backends.cuda.libs.cublas``, reached as ``cupy.cuda.cublas``):
``gemmEx``, the mixed-precision GEMM on device pointers, with cuBLAS's column-major layout.

It computes what cuBLAS does for the types it takes (float32 and bfloat16
inputs and outputs, ``CUBLAS_COMPUTE_32F`` and its tensor-core forms
``CUBLAS_COMPUTE_32F_FAST_16BF`` and ``_FAST_TF32``, which round float32 inputs
to bfloat16 or TensorFloat-32 first, to nearest even): the inputs widened
exactly, the products accumulated in float32 (NumPy's order, not cuBLAS's),
the result rounded once to the output type. On the current stream, as CuPy issues it:
recorded while that stream captures a graph, as touching the allocations its
matrices lie in (a launch after one is freed is refused, as for kernels).
"""

import ctypes

import numpy

from .. import _core
from .._routines_linalg import from_bfloat16_bits, round_mantissa, to_bfloat16_bits
from . import runtime

CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_OP_C = 0, 1, 2
CUBLAS_POINTER_MODE_HOST, CUBLAS_POINTER_MODE_DEVICE = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_16BF, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 75, 77
_INPUT_BITS = {CUBLAS_COMPUTE_32F: None, CUBLAS_COMPUTE_32F_FAST_16BF: 7, CUBLAS_COMPUTE_32F_FAST_TF32: 10}
CUBLAS_GEMM_DEFAULT = -1
_TYPES = {runtime.CUDA_R_32F: numpy.dtype(numpy.float32), 14: numpy.dtype(numpy.uint16)}  # 14: CUDA_R_16BF
_pointer_modes = {}


class CUBLASError(RuntimeError):
    def __init__(self, status, detail):
        self.status = status
        super().__init__(f"{status}: {detail}")


def setPointerMode(handle, mode):
    if mode not in (CUBLAS_POINTER_MODE_HOST, CUBLAS_POINTER_MODE_DEVICE):
        raise CUBLASError("CUBLAS_STATUS_INVALID_VALUE", f"pointer mode {mode}")
    _pointer_modes[handle] = mode


def getPointerMode(handle):
    return _pointer_modes.get(handle, CUBLAS_POINTER_MODE_HOST)


def _matrix(pointer, dtype, rows, cols, ld, what):
    """The column-major ``rows x cols`` matrix at ``pointer`` with leading dimension ``ld``, as a NumPy
    view (writes go to the device memory), and its size in bytes."""
    if ld < max(1, rows):
        raise CUBLASError("CUBLAS_STATUS_INVALID_VALUE", f"ld{what} = {ld} is less than its {rows} rows")
    nbytes = ((cols - 1) * ld + rows) * dtype.itemsize
    flat = numpy.frombuffer((ctypes.c_char * nbytes).from_address(pointer), dtype=dtype)
    return numpy.lib.stride_tricks.as_strided(flat, (rows, cols), (dtype.itemsize, ld * dtype.itemsize)), nbytes


def _host_float(pointer):
    return float(numpy.frombuffer((ctypes.c_char * 4).from_address(pointer), numpy.float32)[0])


def gemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
           computeType, algo):
    """``C = alpha op(A) op(B) + beta C``, column-major: op(A) is m x k, op(B) k x n, C m x n."""
    if computeType not in _INPUT_BITS or Atype != Btype or not {Atype, Ctype} <= _TYPES.keys():
        raise CUBLASError("CUBLAS_STATUS_NOT_SUPPORTED", f"types A {Atype}, B {Btype}, C {Ctype} with compute "
                                                         f"type {computeType} (the stand-in has float32 and "
                                                         f"bfloat16 with CUBLAS_COMPUTE_32F and its FAST_16BF "
                                                         f"and FAST_TF32 forms)")
    if getPointerMode(handle) != CUBLAS_POINTER_MODE_HOST:
        raise CUBLASError("CUBLAS_STATUS_NOT_SUPPORTED", "the stand-in reads alpha and beta from host memory")
    if min(m, n, k) < 0 or {transa, transb} - {CUBLAS_OP_N, CUBLAS_OP_T}:
        raise CUBLASError("CUBLAS_STATUS_INVALID_VALUE", f"m={m}, n={n}, k={k}, transa={transa}, transb={transb}")
    if m == 0 or n == 0:
        return
    scale, keep = _host_float(alpha), _host_float(beta)  # read when the call is made, as cuBLAS does
    matrices = {"A": (A, *_matrix(A, _TYPES[Atype], *((m, k) if transa == CUBLAS_OP_N else (k, m)), lda, "a")),
                "B": (B, *_matrix(B, _TYPES[Btype], *((k, n) if transb == CUBLAS_OP_N else (n, k)), ldb, "b")),
                "C": (C, *_matrix(C, _TYPES[Ctype], m, n, ldc, "c"))}
    (_, a, _), (_, b, _), (_, c, _) = matrices.values()

    def widened(matrix):
        return from_bfloat16_bits(matrix) if matrix.dtype == numpy.uint16 else numpy.asarray(matrix, numpy.float32)

    def tensor_core_input(matrix):
        """The input as the compute type reads it: float32 rounded for the tensor cores (FAST_*)."""
        bits = _INPUT_BITS[computeType]
        return widened(matrix) if bits is None or matrix.dtype == numpy.uint16 else round_mantissa(matrix, bits)

    def run():
        op_a, op_b = tensor_core_input(a), tensor_core_input(b)
        product = (op_a if transa == CUBLAS_OP_N else op_a.T) @ (op_b if transb == CUBLAS_OP_N else op_b.T)
        result = numpy.float32(scale) * product
        if keep:
            result += numpy.float32(keep) * widened(c)
        c[...] = to_bfloat16_bits(result) if c.dtype == numpy.uint16 else result

    capture = _core.recording()
    if capture is None:
        run()
    else:
        capture.add("cublasGemmEx", run, touches=[_core.touch_of(pointer, nbytes, f"gemmEx's {name}")
                                                  for name, (pointer, _, nbytes) in matrices.items()])
