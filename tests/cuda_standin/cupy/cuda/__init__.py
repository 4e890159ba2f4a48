"""The stand-in's ``cupy.cuda``: devices, streams, the runtime and driver APIs, the memory pool."""

import os

from .. import _core
from . import compiler, driver, memory, runtime  # noqa: F401  (CuPy's submodules)
from .memory import MemoryPointer, OutOfMemoryError  # noqa: F401


class Device:
    """An emulated CUDA device: a context that makes it current, as in CuPy."""

    def __init__(self, device=None):
        self.id = _core.current_device_id() if device is None else int(device)
        if not 0 <= self.id < runtime.getDeviceCount():
            raise runtime.CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {self.id}")

    def __enter__(self):
        _core.push_device(self.id)
        return self

    def __exit__(self, *exc):
        _core.pop_device()
        return False

    def use(self):
        _core.use_device(self.id)

    def synchronize(self):
        """Work is done when a call returns; during a graph capture this is refused, as in CUDA."""
        _core.refuse_during_capture("synchronizing the device")

    @property
    def compute_capability(self):
        return "80"

    @property
    def pci_bus_id(self):
        return f"0000:{self.id + 1:02x}:00.0"

    @property
    def mem_info(self):
        return runtime.memGetInfo()

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id} (emulated on the CPU)>"


class Stream:
    """A CUDA stream. Work runs when it is issued, so streams order nothing; they capture graphs."""

    null = None

    def __init__(self, null=False, non_blocking=False, ptr=0):
        self.ptr = 0 if null else id(self)

    def __enter__(self):
        _core._state.__dict__.setdefault("streams", []).append(self)
        return self

    def __exit__(self, *exc):
        _core._state.streams.pop()
        return False

    def synchronize(self):
        _core.refuse_during_capture("synchronizing a stream")

    def use(self):
        _core._state.__dict__.setdefault("streams", [None])[:1] = [self]
        return self

    def __repr__(self):
        return f"<Stream {self.ptr:#x} (emulated)>"


Stream.null = Stream(null=True)


def get_current_stream():
    streams = getattr(_core._state, "streams", None)
    return streams[-1] if streams and streams[-1] is not None else Stream.null


def get_device_id():
    return _core.current_device_id()


def is_available():
    return runtime.getDeviceCount() > 0


def __getattr__(name):
    if name == "nccl":  # imported on use, like CuPy's (it needs mpi4py here)
        import importlib

        return importlib.import_module(f"{__name__}.nccl")
    raise AttributeError(f"module 'cupy.cuda' (the CPU stand-in) has no attribute {name!r}")


DEVICES = int(os.environ.get("CUPY_STANDIN_DEVICES", 2))
SMS = int(os.environ.get("CUPY_STANDIN_SMS", 2))
