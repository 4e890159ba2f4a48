"""The CPU backend: NumPy, with BLAS doing the weighted sums."""

import numpy

from .base import Backend


class NumpyBackend(Backend):
    """Generic ops on NumPy arrays; overrides only what NumPy lacks.

    (SciPy's BLAS ``axpy`` for the SGD step was tried and dropped: SciPy's
    OpenBLAS has a thread pool of its own, and the two pools spinning
    against each other made a training step up to 20 times slower.)
    """

    xp = numpy
    name = "cpu"

    def erf(self, x):
        from scipy.special import erf  # SciPy comes with scikit-learn; only GELU needs it

        return erf(x)
