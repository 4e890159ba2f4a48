"""The stand-in's ``cupy.random``: NumPy's generators, their draws put on the device."""

import numpy

from ._core import _to_device


class Generator:
    def __init__(self, seed=None):
        self._rng = numpy.random.default_rng(seed)

    def __getattr__(self, name):
        method = getattr(self._rng, name)
        return lambda *args, **kwargs: _to_device(method(*args, **kwargs))


def default_rng(seed=None):
    return Generator(seed)
