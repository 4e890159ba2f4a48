"""The emulated CUDA device in this test process: the CuPy stand-in swapped in for a test.

``tests/cuda_standin`` holds a CuPy stand-in whose kernels run on a CPU
runtime for CUDA C. Put first on ``PYTHONPATH`` it serves a whole process
(the subprocess tests do that, through ``ENV``); ``emulated_cuda()`` serves
one test of this process instead, next to the real CuPy: inside it ``import
cupy`` finds the stand-in and nnaccel's device caches start afresh, and
afterwards the real CuPy (if any) is back.
"""

import contextlib
import os
import sys
from pathlib import Path

STANDIN = Path(__file__).resolve().parent / "cuda_standin"
ROOT = STANDIN.parents[1]
# For subprocesses: nnaccel from this checkout and the stand-in first, so `import cupy` finds it.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(STANDIN), str(ROOT),
                                                                 os.environ.get("PYTHONPATH")]))}
_SWAPPED = ("cupy", "cupyx", "cupy_backends")
_standin_modules = {}


def _take(names):
    return {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in names}


def _forget_devices():
    """Clear nnaccel's caches of what CUDA is (device counts, backends, compiled kernels, communicators)."""
    for name, module in list(sys.modules.items()):
        if name == "nnaccel" or name.startswith("nnaccel."):
            for value in vars(module).values():
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()
    communicators = getattr(sys.modules.get("nnaccel.distributed"), "_COMMUNICATORS", None)
    if communicators is not None:
        communicators.clear()


@contextlib.contextmanager
def emulated_cuda():
    """Within: CUDA is the emulated device (two GPUs, ``cuda:0`` and ``cuda:1``)."""
    real = _take(_SWAPPED)
    sys.modules.update(_standin_modules)
    sys.path.insert(0, str(STANDIN))
    _forget_devices()
    try:
        yield
    finally:
        _standin_modules.update(_take(_SWAPPED))
        sys.path.remove(str(STANDIN))
        sys.modules.update(real)
        _forget_devices()


def emulator_seed():
    """The base seed of the emulator's schedules in this process (None before its first use)."""
    module = sys.modules.get("cuda_emulator")
    return getattr(module, "BASE_SEED", None)
