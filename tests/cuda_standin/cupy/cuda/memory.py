"""The stand-in's ``cupy.cuda.memory``: device memory, pointers into it, the pool and the allocators."""

from .._core import (BaseMemory, Memory, MemoryPointer, MemoryPool, OutOfMemoryError,  # noqa: F401  (CuPy's names)
                     PooledMemory, _malloc, alloc, get_allocator, set_allocator)
