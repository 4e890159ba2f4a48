"""The stand-in's ``cupy.cuda.memory``."""

from .._core import MemoryPointer, MemoryPool, OutOfMemoryError  # noqa: F401  (CuPy's names)
