"""The CPU backend: NumPy, with BLAS doing the weighted sums."""

import numpy

from .. import special
from .base import Backend


class NumpyBackend(Backend):
    """Generic ops on NumPy arrays; overrides only what NumPy lacks.

    ``erf`` (for GELU) comes from ``nnaccel.special``, so no SciPy is needed.
    (SciPy's BLAS ``axpy`` for the SGD step was tried and dropped: SciPy's
    OpenBLAS has a thread pool of its own, and the two pools spinning
    against each other made a training step up to 20 times slower.)
    """

    xp = numpy
    name = "cpu"

    def erf(self, x):
        return special.erf(x)

    def precision_note(self, precision):
        if precision == "fp32":
            return None
        return (f"precision {precision!r} is a GPU feature (tensor-core weighted sums); on the CPU the steps "
                f"compute in fp32")
