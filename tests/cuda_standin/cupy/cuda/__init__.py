"""The stand-in's ``cupy.cuda``: devices, streams and graph capture, the runtime and driver APIs, memory and
allocators."""

import os

from .. import _core
from . import compiler, cublas, driver, graph, memory, runtime  # noqa: F401  (CuPy's submodules)
from .graph import Graph  # noqa: F401
from .._core import using_allocator  # noqa: F401  (cupy.cuda's, not cupy.cuda.memory's)
from .memory import BaseMemory, Memory, MemoryPointer, MemoryPool, alloc, get_allocator, set_allocator  # noqa: F401


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
    """A CUDA stream. Work runs when it is issued, so streams order nothing; they capture graphs.

    ``begin_capture()`` ... ``end_capture()`` records the work issued to the stream (inside ``with stream:``) into a
    ``Graph`` instead of running it, with CUDA's rules: no capture on the legacy default stream, one capture at a
    time on a thread, and a call CUDA refuses during a capture (synchronising, copying between host and device,
    reading a value, allocating from the pool) invalidates it, so that ``end_capture()`` raises
    cudaErrorStreamCaptureInvalidated.
    """

    null = ptds = None

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        self.ptr = 0 if null else 2 if ptds else id(self)
        self.device_id = -1 if null or ptds else _core.current_device_id()
        self.non_blocking, self.priority = bool(non_blocking), priority
        self._capture = None

    def __eq__(self, other):
        return isinstance(other, Stream) and other.ptr == self.ptr

    def __hash__(self):
        return self.ptr

    def __enter__(self):
        _core._state.__dict__.setdefault("streams", []).append(self)
        return self

    def __exit__(self, *exc):
        _core._state.streams.pop()
        return False

    @property
    def done(self):
        if self._capture is not None:
            _core.refuse_during_capture("querying a capturing stream")
        return True

    def synchronize(self):
        _core.refuse_during_capture("synchronizing a stream")

    def use(self):
        _core._state.__dict__.setdefault("streams", [None])[:1] = [self]
        return self

    # ----- graph capture (CuPy's API: cupy/cuda/stream.pyx) ------------------------------------------------------
    def begin_capture(self, mode=None):
        """Begin capturing the work issued to this stream into a graph (``mode``: a runtime.streamCaptureMode*;
        whatever it is, the stand-in refuses what CUDA's global mode refuses)."""
        if self.ptr in (0, 1):
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if mode is None:
            mode = runtime.streamCaptureModeRelaxed
        if mode not in (runtime.streamCaptureModeGlobal, runtime.streamCaptureModeThreadLocal,
                        runtime.streamCaptureModeRelaxed):
            raise runtime.CUDARuntimeError(f"cudaErrorInvalidValue: invalid stream capture mode {mode!r}")
        if self._capture is not None:
            raise runtime.CUDARuntimeError(f"cudaErrorIllegalState: the operation cannot be performed in the present "
                                           f"state ({self!r} is already capturing a graph; end_capture() first)")
        other = _core.capturing_stream()
        if other is not None:
            raise runtime.CUDARuntimeError(f"cudaErrorIllegalState: the operation cannot be performed in the present "
                                           f"state (nested capture: {other!r} is capturing a graph on this thread; "
                                           f"end its capture before beginning one on {self!r})")
        self._capture = _core.set_capturing_stream(self, mode)

    def end_capture(self):
        """End the capture and return the ``Graph`` of the work recorded; CUDARuntimeError
        cudaErrorStreamCaptureInvalidated (the capture ended all the same) if a refused call invalidated it."""
        capture = self._capture
        if capture is None:
            raise runtime.CUDARuntimeError(f"cudaErrorIllegalState: the operation cannot be performed in the present "
                                           f"state ({self!r} is not capturing)")
        self._capture = None
        on_this_thread = getattr(_core._state, "capture", None) is capture
        capture.ended = True
        if not on_this_thread:
            raise runtime.CUDARuntimeError("cudaErrorStreamCaptureWrongThread: attempt to terminate a thread-local "
                                           "capture sequence from another thread (the capture is ended)")
        _core.set_capturing_stream(None)
        if capture.invalidated is not None:
            raise runtime.CUDARuntimeError(f"cudaErrorStreamCaptureInvalidated: operation failed due to a previous "
                                           f"error during capture ({capture.invalidated}); the capture on {self!r} "
                                           f"has ended")
        return graph.Graph._from_capture(capture)

    def is_capturing(self):
        """Whether this stream is capturing; RuntimeError if a refused call has invalidated its capture."""
        if self._capture is not None:
            if self._capture.invalidated is not None:
                raise RuntimeError("the stream was capturing, but an error has invalidated the capture sequence")
            return True
        capture = _core.current_capture()
        if self.ptr in (0, 1) and capture is not None and not capture.stream.non_blocking:
            raise runtime.CUDARuntimeError("cudaErrorStreamCaptureImplicit: operation would make the legacy stream "
                                           "depend on a capturing blocking stream")
        return False

    def __repr__(self):
        return f"<Stream {self.ptr:#x} (emulated)>"


Stream.null = Stream(null=True)
Stream.ptds = Stream(ptds=True)


def get_current_stream():
    streams = getattr(_core._state, "streams", None)
    return streams[-1] if streams and streams[-1] is not None else Stream.null


def get_device_id():
    return _core.current_device_id()


def get_cublas_handle():
    """The current device's cuBLAS handle (an opaque number, as in CuPy)."""
    return 0xC0B1A5 + _core.current_device_id()


def is_available():
    return runtime.getDeviceCount() > 0


def __getattr__(name):
    if name == "nccl":  # imported on use, like CuPy's (it needs mpi4py here)
        import importlib

        return importlib.import_module(f"{__name__}.nccl")
    raise AttributeError(f"module 'cupy.cuda' (the CPU stand-in) has no attribute {name!r}")


DEVICES = int(os.environ.get("CUPY_STANDIN_DEVICES", 2))
SMS = int(os.environ.get("CUPY_STANDIN_SMS", 2))
