"""The stand-in's ``cupyx.scipy.special``."""

import math

import numpy

from cupy._core import _apply

_erf = numpy.frompyfunc(math.erf, 1, 1)


def erf(x, out=None):
    """The error function of a device array, elementwise (the C library's ``erf``), keeping its dtype."""
    def compute(values, out=None):
        result = _erf(values).astype(values.dtype)
        if out is None:
            return result
        out[...] = result
        return out

    return _apply(compute, (x,), {} if out is None else {"out": out})
