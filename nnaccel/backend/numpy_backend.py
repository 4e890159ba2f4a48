"""The CPU backend: NumPy, with BLAS doing the weighted sums."""

import numpy

from .base import Backend


class NumpyBackend(Backend):
    """Generic ops on NumPy arrays; overrides only what NumPy lacks."""

    xp = numpy
    name = "cpu"

    def erf(self, x):
        from scipy.special import erf  # SciPy comes with scikit-learn; only GELU needs it

        return erf(x)
