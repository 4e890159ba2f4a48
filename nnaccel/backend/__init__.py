"""Devices by name, and the backend that runs each one.

A device is one string: ``"cpu"``, ``"cuda"`` (the first GPU), ``"cuda:N"``,
or ``"auto"`` (CUDA when CuPy imports and a GPU answers, else the CPU).
"CuPy imports" is not "a GPU is present": CuPy installs on machines without
a driver and fails at the first allocation, so both are checked.
"""

import functools

from ..errors import DeviceError
from .base import PRECISIONS, Backend, array_device
from .numpy_backend import NumpyBackend

__all__ = ["PRECISIONS", "Backend", "array_device", "cuda_status", "get_backend", "resolve_device"]


@functools.lru_cache(maxsize=None)
def cuda_status():
    """``(device_count, reason)``: how many GPUs answer, and why none when 0."""
    try:
        import cupy
    except ImportError:
        return 0, "CuPy is not installed (pip install 'nnaccel[cuda12]' or 'nnaccel[cuda13]')"
    except Exception as error:  # a broken CuPy install fails in many ways
        return 0, f"CuPy failed to import: {type(error).__name__}: {error}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError: no driver, driver too old, ...
        return 0, f"CuPy {cupy.__version__} is installed but no CUDA driver answers: {error}"
    if count == 0:
        return 0, f"CuPy {cupy.__version__} is installed but no CUDA device was found"
    return count, ""


def resolve_device(device="auto"):
    """The canonical name (``"cpu"`` or ``"cuda:N"``) of a device string."""
    if not isinstance(device, str):
        raise DeviceError(f"device must be a string like 'cpu', 'cuda', 'cuda:0' or 'auto', got {device!r}")
    name = device.strip().lower()
    if name == "cpu":
        return "cpu"
    if name == "auto":
        return "cuda:0" if cuda_status()[0] else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cuda", "gpu") or (index and not index.isdigit()):
        raise DeviceError(f"unknown device {device!r}; valid: 'cpu', 'cuda', 'cuda:N', 'auto'")
    count, reason = cuda_status()
    if count == 0:
        raise DeviceError(f"device {device!r} is not usable: {reason}")
    index = int(index or 0)
    if index >= count:
        raise DeviceError(f"device {device!r} does not exist: {count} CUDA device(s) found (cuda:0..cuda:{count - 1})")
    return f"cuda:{index}"


@functools.lru_cache(maxsize=None)
def _backend_for(name):
    if name == "cpu":
        return NumpyBackend()
    from .cupy_backend import CupyBackend

    return CupyBackend(int(name.split(":")[1]))


def get_backend(device="cpu"):
    """The (shared) backend for a device string."""
    return _backend_for(resolve_device(device))
