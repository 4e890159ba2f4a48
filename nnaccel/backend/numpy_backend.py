"""The CPU backend: NumPy, with BLAS doing the weighted sums and the SGD step."""

import functools

import numpy

from .base import Backend


@functools.lru_cache(maxsize=None)
def _blas(dtype):
    """SciPy's BLAS ``axpy`` and ``scal`` for a dtype (SciPy comes with scikit-learn)."""
    from scipy.linalg import blas

    return blas.get_blas_funcs(("axpy", "scal"), dtype=numpy.dtype(dtype))


class NumpyBackend(Backend):
    """Generic ops on NumPy arrays; overrides what BLAS does in fewer passes."""

    xp = numpy
    name = "cpu"

    def erf(self, x):
        from scipy.special import erf  # only GELU needs it

        return erf(x)

    def sgd_update(self, param, grad, velocity, lr, momentum, weight_decay, nesterov):
        """PyTorch's SGD step as BLAS axpy/scal calls in place on the flat buffers.

        NumPy would need four passes and a temporary the size of the model;
        BLAS does it in three threaded passes and allocates nothing.
        """
        if param.ndim != 1 or not (param.flags.c_contiguous and grad.flags.c_contiguous):
            return super().sgd_update(param, grad, velocity, lr, momentum, weight_decay, nesterov)
        axpy, scal = _blas(param.dtype)
        if momentum:
            scal(momentum, velocity)  # v = momentum * v + g + wd * p
            axpy(grad, velocity)
            if weight_decay:
                axpy(param, velocity, a=weight_decay)
            if nesterov:  # p -= lr * (g + wd * p + momentum * v)
                if weight_decay:
                    scal(1.0 - lr * weight_decay, param)
                axpy(grad, param, a=-lr)
                axpy(velocity, param, a=-lr * momentum)
            else:
                axpy(velocity, param, a=-lr)
        else:  # p -= lr * (g + wd * p)
            if weight_decay:
                scal(1.0 - lr * weight_decay, param)
            axpy(grad, param, a=-lr)
        return param
