"""CuPy's ``cupy._core._routines_linalg`` compute types: how cuBLAS may compute float32 products.

``set_compute_type(numpy.float32, COMPUTE_TYPE_TF32)`` lets cuBLAS round the
inputs of a float32 GEMM to TensorFloat-32 (10 explicit mantissa bits) for the
tensor cores, products accumulated in float32: CuPy passes
``CUBLAS_COMPUTE_32F_FAST_TF32`` to the ``gemmEx`` of its 2-D products
(``dot``, ``matmul`` of 2-D arrays), and nothing to its batched ones. The
stand-in's ``cupy.matmul`` does the same rounding (to nearest, ties to even)
before NumPy's float32 product, so a run with TF32 computes what a GPU's tensor
cores would, within float32 accumulation order. ``COMPUTE_TYPE_BF16`` is
stored but changes no float32 product, as in CuPy, which maps it to
``CUBLAS_COMPUTE_32F`` (bfloat16 on the tensor cores takes a ``gemmEx`` with
``CUBLAS_COMPUTE_32F_FAST_16BF``, ``cupy.cuda.cublas``).
"""

import os
import warnings

import numpy

COMPUTE_TYPE_TBD, COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_PEDANTIC = 0, 1, 2
COMPUTE_TYPE_FP16, COMPUTE_TYPE_FP32, COMPUTE_TYPE_FP64 = 3, 4, 5
COMPUTE_TYPE_BF16, COMPUTE_TYPE_TF32 = 6, 7
_NAMES = {0: "COMPUTE_TYPE_TBD", 1: "COMPUTE_TYPE_DEFAULT", 2: "COMPUTE_TYPE_PEDANTIC", 3: "COMPUTE_TYPE_FP16",
          4: "COMPUTE_TYPE_FP32", 5: "COMPUTE_TYPE_FP64", 6: "COMPUTE_TYPE_BF16", 7: "COMPUTE_TYPE_TF32"}
_MANTISSA_BITS = {COMPUTE_TYPE_TF32: 10}  # what CuPy's 2-D float32 products round to
_compute_types = {}  # dtype character -> compute type; absent is TBD, which the first get decides


def _index(dtype):
    char = numpy.dtype(dtype).char
    if char not in "efFdD":
        raise TypeError(f"dtype is not supported: {dtype}")
    return {"F": "f", "D": "d"}.get(char, char)


def set_compute_type(dtype, compute_type):
    """As CuPy's: BF16 and TF32 on a device older than compute capability 8.0 warn and set DEFAULT."""
    if compute_type not in _NAMES:
        raise ValueError(f"Unknown compute type: {compute_type}")
    if compute_type in (COMPUTE_TYPE_BF16, COMPUTE_TYPE_TF32):
        from .cuda import Device  # here: cupy.cuda imports this module

        if int(Device().compute_capability) < 80:
            warnings.warn("COMPUTE_TYPE_BF16 and COMPUTE_TYPE_TF32 are only available on GPUs with compute "
                          "capability 8.0 or higher. COMPUTE_TYPE_DEFAULT will be used instead.")
            compute_type = COMPUTE_TYPE_DEFAULT
    _compute_types[_index(dtype)] = compute_type


def get_compute_type(dtype):
    """As CuPy's: a type still TBD becomes TF32 for float32 under ``CUPY_TF32`` > 0, else DEFAULT."""
    index = _index(dtype)
    if _compute_types.get(index, COMPUTE_TYPE_TBD) == COMPUTE_TYPE_TBD:
        tf32 = index == "f" and int(os.getenv("CUPY_TF32", "0")) > 0
        set_compute_type(dtype, COMPUTE_TYPE_TF32 if tf32 else COMPUTE_TYPE_DEFAULT)
    return _compute_types[index]


def compute_type_to_str(compute_type):
    return _NAMES.get(compute_type, compute_type)


def mantissa_bits(dtype, ndim=2):
    """The explicit mantissa bits the inputs of a float32 product of ``ndim``-D arrays are rounded to
    now (None: not rounded; CuPy's batched products, ``ndim`` > 2, take no compute type)."""
    if numpy.dtype(dtype) != numpy.float32 or ndim > 2:
        return None
    return _MANTISSA_BITS.get(get_compute_type(dtype))


def round_mantissa(x, bits):
    """float32 ``x`` rounded to ``bits`` explicit mantissa bits, to nearest with ties to even, as the
    tensor cores' input conversion does (NaN and infinities stay what they are)."""
    x = numpy.ascontiguousarray(x, numpy.float32)
    drop = 23 - bits
    word = x.view(numpy.uint32).astype(numpy.uint64)
    rounded = ((word + ((word >> drop) & 1) + (1 << (drop - 1)) - 1) >> drop) << drop
    result = rounded.astype(numpy.uint32).view(numpy.float32)
    return numpy.where(numpy.isfinite(x), result, x)


def to_bfloat16_bits(x):
    """float32 ``x`` as bfloat16 bits (uint16), as CUDA's ``__float2bfloat16`` converts: rounded to
    nearest, ties to even, and every NaN to the canonical NaN 0x7fff."""
    x = numpy.ascontiguousarray(x, numpy.float32)
    bits = (round_mantissa(x, 7).view(numpy.uint32) >> 16).astype(numpy.uint16)
    return numpy.where(numpy.isnan(x), numpy.uint16(0x7fff), bits)


def from_bfloat16_bits(bits):
    """bfloat16 bits (uint16) as float32, exactly."""
    return (numpy.asarray(bits, numpy.uint16).astype(numpy.uint32) << 16).view(numpy.float32)
