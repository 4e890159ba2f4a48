"""NumPy's own BLAS, for the two level-1 routines NumPy has no one-pass op for: ``axpy`` and ``axpby``.

An optimizer step is a few passes over every parameter; NumPy runs each on one core and writes its
temporaries out, while OpenBLAS's ``y += a*x`` and ``y = a*x + b*y`` are one pass each, on every BLAS
thread. The library is loaded from NumPy's own folder, so it is the copy (and the thread pool) that
NumPy's matmul already uses: a second OpenBLAS would spin its own threads against the first's.
"""

import ctypes
import functools
import glob
import os

import numpy


class Level1:
    """``axpy`` and ``axpby`` of one OpenBLAS over contiguous float32 or float64 vectors."""

    def __init__(self, library, prefix, suffix, integer):
        self._routines = {}
        for dtype, letter, real in ((numpy.float32, "s", ctypes.c_float), (numpy.float64, "d", ctypes.c_double)):
            axpy = getattr(library, f"{prefix}cblas_{letter}axpy{suffix}")
            axpby = getattr(library, f"{prefix}cblas_{letter}axpby{suffix}")
            axpy.restype = axpby.restype = None
            axpy.argtypes = [integer, real, ctypes.c_void_p, integer, ctypes.c_void_p, integer]
            axpby.argtypes = [integer, real, ctypes.c_void_p, integer, real, ctypes.c_void_p, integer]
            self._routines[numpy.dtype(dtype)] = axpy, axpby

    def takes(self, *arrays):
        """Whether the arrays are NumPy vectors of one supported dtype that a BLAS call can walk."""
        dtype = arrays[0].dtype
        return dtype in self._routines and all(
            type(a) is numpy.ndarray and a.dtype == dtype and a.flags.c_contiguous and a.size == arrays[0].size
            for a in arrays)

    def axpy(self, alpha, x, y):
        """``y += alpha * x``, in place."""
        self._routines[y.dtype][0](y.size, alpha, x.ctypes.data, 1, y.ctypes.data, 1)
        return y

    def axpby(self, alpha, x, beta, y):
        """``y = alpha * x + beta * y``, in place."""
        self._routines[y.dtype][1](y.size, alpha, x.ctypes.data, 1, beta, y.ctypes.data, 1)
        return y


# The scipy-openblas that NumPy's wheels bundle: symbols prefixed "scipy_", and with 64-bit integers
# (ILP64, suffix "64_") on 64-bit platforms; looked for where the wheels put it.
_BUNDLED = (("scipy_", "64_", ctypes.c_int64), ("scipy_", "", ctypes.c_int32))
_BUNDLE_FOLDERS = (os.path.join(os.pardir, "numpy.libs"), ".dylibs")


@functools.cache
def numpy_blas():
    """NumPy's bundled OpenBLAS as a ``Level1``, or None where NumPy has another BLAS, or none there."""
    config = getattr(numpy.__config__, "CONFIG", {})  # NumPy 1.26 and later
    if config.get("Build Dependencies", {}).get("blas", {}).get("name") != "scipy-openblas":
        return None
    here = os.path.dirname(numpy.__file__)
    for folder in _BUNDLE_FOLDERS:
        for path in sorted(glob.glob(os.path.join(here, folder, "*scipy_openblas*"))):
            try:
                library = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix, suffix, integer in _BUNDLED:
                if hasattr(library, f"{prefix}cblas_saxpby{suffix}"):
                    return Level1(library, prefix, suffix, integer)
    return None
