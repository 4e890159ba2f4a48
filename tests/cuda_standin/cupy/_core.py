"""The stand-in's arrays: device memory from the CUDA emulator, NumPy computing on it.

An ``ndarray`` is a NumPy view of emulated device memory (guarded and
garbage-filled, see ``cuda_emulator.allocate``) plus the device it lives on.
Operations unwrap their arguments, check that every array is on the current
device (as CuPy's kernels do), run NumPy on the views and put any new result
in fresh device memory. As in CuPy, NumPy arrays are refused where device
arrays are expected, and nothing converts a device array to the host
implicitly. Every new array takes its memory from the current allocator
(``cupy.cuda.alloc``: the default pool's ``malloc`` unless ``set_allocator``
or ``using_allocator`` says otherwise).

While a stream captures a CUDA graph (``Stream.begin_capture``), work issued
to it is recorded, not run, as CUDA does: each operation is evaluated on
scratch copies of its operands to learn what it returns (shapes, dtypes,
which results are views), its new arrays get memory from the allocator, and
``Graph.launch`` runs the recorded NumPy calls and kernel launches, in order,
on the same memory. Calls CUDA refuses during a capture (synchronisation,
copies between host and device, reading values, allocating from the pool)
raise and invalidate the capture, as in CUDA's global capture mode.
"""

import contextlib
import sys
import ctypes
import inspect
import threading
import weakref

import numpy
from numpy.lib.array_utils import byte_bounds

import cuda_emulator

_state = threading.local()
DEVICE_MEMORY = 16 << 30  # bytes each emulated device reports


# ----- devices -----------------------------------------------------------------------------
def current_device_id():
    stack = getattr(_state, "devices", None)
    return stack[-1] if stack else 0


def push_device(device_id):
    if not hasattr(_state, "devices"):
        _state.devices = []
    _state.devices.append(device_id)


def pop_device():
    _state.devices.pop()


def use_device(device_id):
    """Make ``device_id`` current outside any ``with Device(...)`` block too."""
    if not getattr(_state, "devices", None):
        _state.devices = [device_id]
    else:
        _state.devices[0] = device_id


# ----- graph capture -------------------------------------------------------------------------
class Operation:
    """One recorded piece of device work: ``run()`` does it; ``touches`` are ``(weakref to the Memory, what it
    held)`` for each allocation it reads or writes, checked before every replay."""

    __slots__ = ("label", "run", "touches")

    def __init__(self, label, run, touches):
        self.label, self.run, self.touches = label, run, touches


def _describe(array):
    memory = array._memory
    return (f"the {memory.size:,}-byte allocation at {memory.ptr:#x} holding a {array.dtype} array of shape "
            f"{array.shape}")


class Capture:
    """A stream's capture in progress on this thread: the operations recorded so far, in order, and what (if
    anything) invalidated it."""

    def __init__(self, stream, mode):
        self.stream, self.mode = stream, mode
        self.operations = []
        self.invalidated = None
        self.ended = False

    def add(self, label, run, arrays=(), touches=()):
        """Record ``run`` (a callable holding no device array, only NumPy views and values) as touching the
        memory of ``arrays`` (stand-in ndarrays) and ``touches`` (more ``(weakref, what)`` pairs)."""
        found, seen = list(touches), set()
        for array in arrays:
            memory = array._memory
            if memory.size and id(memory) not in seen:
                seen.add(id(memory))
                found.append((weakref.ref(memory), _describe(array)))
        self.operations.append(Operation(label, run, found))

    def record_call(self, function, args, kwargs, sources, out, label):
        """Record ``function(*args, **kwargs)`` (arguments unwrapped to NumPy views of ``sources``) and return
        what it returns eagerly: ``out``, views of its operands, or new arrays whose contents the graph makes."""
        label = label or _label(function)
        if function in _METADATA:  # reads no element: answer now, as it would eagerly
            return function(*args, **kwargs)
        if _shape_depends_on_values(function, args, kwargs):
            refuse_during_capture(f"reading a device value on the host ({label}: the size of its result depends "
                                  f"on the data, so CuPy copies a count to the host)")
        dry = _dry_run(function, args, kwargs, sources)
        if out is not None:
            self.add(label, _replay(function, args, kwargs, []), sources)
            return out
        targets, views = [], [0]

        def convert(value, path):
            if isinstance(value, (tuple, list)):
                return type(value)(convert(v, path + (i,)) for i, v in enumerate(value))
            if isinstance(value, numpy.ndarray) and value.size:
                real = _real_view(value, dry.buffers)
                if real is not None:
                    views[0] += 1
                    return real
            if isinstance(value, (numpy.ndarray, numpy.generic, bool, int, float, complex)):
                host = numpy.asarray(value)
                array = ndarray(host.shape, host.dtype)  # from the current allocator, at capture time
                targets.append((path, array))
                return array
            return value

        wrapped = convert(dry.value, ())
        if dry.value is not None and not targets and views[0]:
            return wrapped  # views of the operands only: nothing to do on the device
        self.add(label, _replay(function, args, kwargs, [(path, array._view) for path, array in targets]),
                 list(sources) + [array for _, array in targets])
        return wrapped


def current_capture():
    """This thread's capture in progress, or None."""
    capture = getattr(_state, "capture", None)
    if capture is not None and capture.ended:  # ended from another thread
        capture = _state.capture = None
    return capture


def capturing_stream():
    """The stream capturing a graph on this thread, or None."""
    capture = current_capture()
    return capture.stream if capture is not None else None


def set_capturing_stream(stream, mode=None):
    """Begin (``stream``) or forget (None) this thread's capture; ``Stream.begin_capture`` calls it."""
    _state.capture = None if stream is None else Capture(stream, mode)
    return _state.capture


def _current_stream():
    from .cuda import get_current_stream

    return get_current_stream()


def refuse_during_capture(what):
    """Raise CUDA's error for ``what`` while this thread captures a graph, invalidating the capture."""
    capture = current_capture()
    if capture is None:
        return
    from .cuda.runtime import CUDARuntimeError

    if capture.invalidated is None:
        capture.invalidated = what
    stream = capture.stream
    hint = ""
    current = _current_stream()
    if current.ptr != stream.ptr:
        hint = (f"; note that the current stream is {current!r}, not the capturing one: work is captured only "
                f"inside `with stream:`")
    raise CUDARuntimeError(f"cudaErrorStreamCaptureUnsupported: {what} is not permitted while stream {stream!r} "
                           f"captures a graph (CUDA invalidates the capture: end_capture() will raise "
                           f"cudaErrorStreamCaptureInvalidated){hint}")


def recording(stream=None):
    """The capture that device work issued now (to ``stream``, a Stream or its ``ptr``; default the current
    stream) goes into, or None when the work runs now.

    Work on the capturing stream is recorded; work on the legacy default stream while a blocking stream captures
    is CUDA's cudaErrorStreamCaptureImplicit (and invalidates the capture); work on other streams runs.
    """
    capture = getattr(_state, "capture", None)
    if capture is None or capture.ended:
        return current_capture()
    from .cuda.runtime import CUDARuntimeError

    target = _current_stream() if stream is None else stream
    pointer = target if isinstance(target, int) else target.ptr
    if pointer == capture.stream.ptr:
        if capture.invalidated is not None:
            raise CUDARuntimeError(f"cudaErrorStreamCaptureInvalidated: operation failed due to a previous error "
                                   f"during capture ({capture.invalidated} invalidated the capture on stream "
                                   f"{capture.stream!r}; call end_capture() to end it)")
        return capture
    if pointer in (0, 1) and not capture.stream.non_blocking:
        if capture.invalidated is None:
            capture.invalidated = "work issued to the legacy default stream"
        raise CUDARuntimeError(f"cudaErrorStreamCaptureImplicit: operation would make the legacy stream depend on "
                               f"a capturing blocking stream (work issued to the default stream while "
                               f"{capture.stream!r} captures: issue it inside `with stream:`; the capture is "
                               f"invalidated)")
    return None


def _label(function):
    owner = getattr(function, "__self__", None)
    name = getattr(function, "__name__", type(function).__name__)
    if isinstance(owner, numpy.ufunc):
        return f"numpy.{owner.__name__}.{name}"
    if isinstance(function, numpy.ufunc) or (getattr(function, "__module__", None) or "").startswith("numpy"):
        return f"numpy.{name}"
    return name


# (Not ``shares_memory``: CuPy's exact answer is computed on the device, a sort of every element's address, and
# copied to the host, which a capture refuses; ``may_share_memory`` compares the bounds on the host.)
_METADATA = {numpy.shape, numpy.ndim, numpy.size, numpy.result_type, numpy.may_share_memory, numpy.iscomplexobj,
             numpy.isrealobj}
_VALUE_SHAPED = {getattr(numpy, name) for name in ("nonzero", "flatnonzero", "argwhere", "unique", "unique_all",
                                                   "unique_counts", "unique_inverse", "unique_values", "compress",
                                                   "extract", "bincount", "trim_zeros") if hasattr(numpy, name)}


def _shape_depends_on_values(function, args, kwargs):
    if function in _VALUE_SHAPED:
        return True
    if function is numpy.where:
        return len(args) + len(kwargs) == 1
    if function is numpy.repeat:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, numpy.ndarray) and repeats.size > 1
    return False


class _DryRun:
    """``function`` evaluated on scratch copies of the memory its operands view (real memory stays as it is)."""

    def __init__(self, function, args, kwargs, sources, zeros):
        regions = {}
        for source in sources:
            if source._view.size:
                low, high = byte_bounds(source._view)
                region = regions.setdefault(id(source._memory), [source._memory, low, high])
                region[1], region[2] = min(region[1], low), max(region[2], high)
        self.buffers = []  # (memory, address its scratch copy starts at, the copy)
        scratch_of = {}
        for memory, low, high in regions.values():
            start = low - memory.ptr
            copy = (numpy.zeros(high - low, numpy.uint8) if zeros
                    else memory.host_view()[start:start + high - low].copy())
            self.buffers.append((memory, low, copy))
            scratch_of[id(memory)] = (low, copy)
        views = {}
        for source in sources:
            view = source._view
            if id(view) in views:
                continue
            if not view.size:
                views[id(view)] = numpy.empty(view.shape, view.dtype)
            else:
                low, copy = scratch_of[id(source._memory)]
                views[id(view)] = numpy.ndarray(view.shape, view.dtype, buffer=copy, offset=view.ctypes.data - low,
                                                strides=view.strides)

        def swap(value):
            if isinstance(value, numpy.ndarray):
                return views.get(id(value), value)
            if isinstance(value, (tuple, list)):
                return type(value)(swap(v) for v in value)
            if isinstance(value, dict):
                return {k: swap(v) for k, v in value.items()}
            return value

        with numpy.errstate(all="ignore"):
            self.value = function(*swap(list(args)), **swap(dict(kwargs)))


def _dry_run(function, args, kwargs, sources):
    """The dry run on copies of the operands' current contents; where those make it fail (garbage indices in
    memory no operation has written yet), on zeros; the first error if both fail."""
    try:
        return _DryRun(function, args, kwargs, sources, zeros=False)
    except Exception as error:
        try:
            return _DryRun(function, args, kwargs, sources, zeros=True)
        except Exception:
            raise error from None


def _real_view(value, buffers):
    """The stand-in array for ``value``, a dry-run result viewing a scratch copy: the same view of real memory."""
    for memory, low, copy in buffers:
        if numpy.may_share_memory(value, copy):
            offset = value.ctypes.data - copy.ctypes.data + low - memory.ptr
            view = numpy.ndarray(value.shape, value.dtype, buffer=memory.host_view(), offset=offset,
                                 strides=value.strides)
            return ndarray._over(view, memory)
    return None


def _replay(function, args, kwargs, targets):
    """What a graph runs for a recorded call: the call on the real views, each new result copied to its memory."""
    def run():
        with numpy.errstate(all="ignore"):
            result = function(*args, **kwargs)
        for path, view in targets:
            value = result
            for index in path:
                value = value[index]
            view[...] = value

    return run


# ----- memory ---------------------------------------------------------------------------------
class OutOfMemoryError(MemoryError):
    """CuPy's error for an allocation beyond the pool's limit or the device's memory."""

    def __init__(self, size, total, limit=0):
        message = f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes"
        message += f", limit set to: {limit:,} bytes)." if limit else ")."
        super().__init__(message)


_live_allocations = weakref.WeakValueDictionary()  # address -> the Memory or PooledMemory there, while alive


def touch_of(address, nbytes, what):
    """The ``(weakref to the Memory, what it held)`` that a recorded operation reading or writing ``nbytes``
    at device address ``address`` (a library call on raw pointers) touches; a CUDARuntimeError if no live
    allocation holds them all."""
    for memory in list(_live_allocations.values()):
        if memory.ptr <= address and address + nbytes <= memory.ptr + memory.size:
            return weakref.ref(memory), f"the {memory.size:,}-byte allocation at {memory.ptr:#x} ({what})"
    from .cuda.runtime import CUDARuntimeError

    raise CUDARuntimeError(f"cudaErrorIllegalAddress: {what}: {nbytes:,} bytes at {address:#x} are not inside one "
                           f"live device allocation")


class BaseMemory:
    """Memory on an emulated device: ``ptr``, ``size`` (bytes) and ``device_id``, as CuPy's."""

    ptr = size = device_id = 0

    @property
    def device(self):
        from .cuda import Device

        return Device(self.device_id)

    def __int__(self):
        return self.ptr

    def host_view(self):
        """A NumPy byte array over the allocation (empty for 0 bytes)."""
        if not self.size:
            return numpy.empty(0, numpy.uint8)
        return numpy.frombuffer((ctypes.c_char * self.size).from_address(self.ptr), dtype=numpy.uint8)

    def __repr__(self):
        return f"<{type(self).__name__} {self.size:,} bytes at {self.ptr:#x} on device {self.device_id}>"


class Memory(BaseMemory):
    """CuPy's ``cupy.cuda.Memory(size)``: a device allocation of its own (cudaMalloc), freed with the object."""

    def __init__(self, size):
        self.size, self.device_id, self.ptr = int(size), current_device_id(), 0
        if self.size > 0:
            refuse_during_capture("allocating device memory (cudaMalloc)")
            try:
                self.ptr = cuda_emulator.allocate(self.size)
            except MemoryError:
                from .cuda.runtime import CUDARuntimeError

                raise CUDARuntimeError("cudaErrorMemoryAllocation: out of memory") from None
            weakref.finalize(self, cuda_emulator.free, self.ptr, self.size)
            _live_allocations[self.ptr] = self


class PooledMemory(BaseMemory):
    """A block of the memory pool; returned to the pool when the last array over it is gone."""

    def __init__(self, pool, device_id, address, nbytes):
        self.device_id, self.ptr, self.size = device_id, address, nbytes
        weakref.finalize(self, pool._release, device_id, address, nbytes)
        _live_allocations[address] = self


class MemoryPointer:
    """CuPy's ``MemoryPointer(mem, offset)``: a place ``offset`` bytes into ``mem``; ``ptr`` is its address."""

    def __init__(self, mem, offset):
        if not isinstance(mem, BaseMemory):
            raise TypeError(f"MemoryPointer needs a cupy.cuda.BaseMemory, got {type(mem).__name__}")
        offset = int(offset)
        assert mem.ptr != 0 or offset == 0
        self.mem, self.ptr, self.device_id = mem, mem.ptr + offset, mem.device_id

    @property
    def device(self):
        from .cuda import Device

        return Device(self.device_id)

    def __int__(self):
        return self.ptr

    def __add__(self, offset):
        if not isinstance(offset, (int, numpy.integer)):
            return NotImplemented
        assert self.ptr != 0 or offset == 0
        return MemoryPointer(self.mem, self.ptr - self.mem.ptr + int(offset))

    __radd__ = __add__

    def __sub__(self, offset):
        if not isinstance(offset, (int, numpy.integer)):
            return NotImplemented
        return self + -int(offset)

    def __iadd__(self, offset):
        assert self.ptr != 0 or offset == 0
        self.ptr += int(offset)
        return self

    def __isub__(self, offset):
        return self.__iadd__(-int(offset))

    def __repr__(self):
        return f"<MemoryPointer {self.ptr:#x} device={self.device_id} mem={self.mem!r}>"


class MemoryPool:
    """CuPy's default memory pool: freed blocks are kept for reuse (by size), an optional limit."""

    def __init__(self):
        self._lock = threading.Lock()
        self._used, self._cached, self._limit = {}, {}, {}
        self._free = {}  # (device, nbytes) -> [address]

    def malloc(self, size):
        """A MemoryPointer to ``size`` bytes of the current device, from the pool if it holds a free block."""
        nbytes = int(size)
        if nbytes == 0:
            return MemoryPointer(Memory(0), 0)
        refuse_during_capture("allocating from the memory pool")
        device = current_device_id()
        with self._lock:
            used = self._used.get(device, 0)
            limit = self._limit.get(device, 0)
            if (limit and used + nbytes > limit) or used + nbytes > DEVICE_MEMORY:
                raise OutOfMemoryError(nbytes, used, limit)
            reused = self._free.get((device, nbytes))
            address = reused.pop() if reused else None
            if address is not None:
                self._cached[device] -= nbytes
            self._used[device] = used + nbytes
        if address is None:
            try:
                address = cuda_emulator.allocate(nbytes)
            except MemoryError:
                with self._lock:
                    self._used[device] -= nbytes
                raise OutOfMemoryError(nbytes, used, limit) from None
        else:
            cuda_emulator.fill_garbage(address, nbytes)
        return MemoryPointer(PooledMemory(self, device, address, nbytes), 0)

    def _release(self, device, address, nbytes):
        with self._lock:
            self._used[device] -= nbytes
            self._cached[device] = self._cached.get(device, 0) + nbytes
            self._free.setdefault((device, nbytes), []).append(address)

    def used_bytes(self):
        return self._used.get(current_device_id(), 0)

    def free_bytes(self):
        return self._cached.get(current_device_id(), 0)

    def total_bytes(self):
        return self.used_bytes() + self.free_bytes()

    def set_limit(self, size=None, fraction=None):
        if fraction is not None:
            size = int(DEVICE_MEMORY * fraction)
        self._limit[current_device_id()] = int(size or 0)

    def get_limit(self):
        return self._limit.get(current_device_id(), 0)

    def free_all_blocks(self, stream=None):
        with self._lock:
            blocks, self._free = self._free, {}
            self._cached = {}
        for (_, nbytes), addresses in blocks.items():
            for address in addresses:
                cuda_emulator.free(address, nbytes)

    def n_free_blocks(self):
        return sum(len(addresses) for addresses in self._free.values())


_pool = MemoryPool()


def get_default_memory_pool():
    return _pool


# ----- allocators (CuPy's cupy.cuda.alloc, set_allocator, get_allocator, using_allocator) ---------------------
def _malloc(size):
    """The raw allocator (cudaMalloc, no pool): what ``set_allocator(None)`` selects."""
    return MemoryPointer(Memory(size), 0)


_current_allocator = _pool.malloc  # as ``import cupy`` sets it


def alloc(size):
    """A MemoryPointer to ``size`` bytes from the current allocator."""
    return get_allocator()(size)


def set_allocator(allocator=None):
    """Make ``allocator`` (``size -> MemoryPointer``; None: the raw allocator) the allocator of every thread."""
    global _current_allocator
    if getattr(_state, "allocator", None) is not None:
        raise ValueError("Can't change the global allocator inside `using_allocator` context manager")
    _current_allocator = _malloc if allocator is None else allocator


def get_allocator():
    allocator = getattr(_state, "allocator", None)
    return _current_allocator if allocator is None else allocator


@contextlib.contextmanager
def using_allocator(allocator=None):
    """Within: ``allocator`` (None: the raw allocator) allocates for this thread."""
    previous = getattr(_state, "allocator", None)
    _state.allocator = _malloc if allocator is None else allocator
    try:
        yield
    finally:
        _state.allocator = previous


# ----- arrays ---------------------------------------------------------------------------------
def _reject_host(value):
    raise TypeError(f"Unsupported type {type(value)}")


def _view_over(memptr, shape, dtype, strides, order):
    if not isinstance(memptr, MemoryPointer):
        raise TypeError(f"memptr must be a cupy.cuda.MemoryPointer (what an allocator returns), got "
                        f"{type(memptr).__name__}")
    memory, offset = memptr.mem, memptr.ptr - memptr.mem.ptr
    try:
        return numpy.ndarray(shape, dtype, buffer=memory.host_view(), offset=offset, strides=strides, order=order)
    except (TypeError, ValueError) as error:
        raise ValueError(f"a {dtype} array of shape {shape} does not fit {memory.size:,}-byte allocation at "
                         f"{memory.ptr:#x} from byte {offset:,} ({error}); on a GPU it would read and write past "
                         f"the memory it was given") from None


class ndarray:
    """An array on an emulated CUDA device (CuPy's ``cupy.ndarray``)."""

    __array_priority__ = 100

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        dtype = numpy.dtype(dtype)
        shape = tuple(int(s) for s in shape) if isinstance(shape, (tuple, list)) else (int(shape),)
        if memptr is None:
            memptr = alloc(int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize)
        self._set(_view_over(memptr, shape, dtype, strides, order), memptr.mem)

    def _set(self, view, memory):
        self._view, self._memory = view, memory
        return self

    @classmethod
    def _over(cls, view, memory):
        """An ndarray for ``view``, a NumPy view of ``memory``."""
        return cls.__new__(cls)._set(view, memory)

    # ----- what it is ------------------------------------------------------------------------
    shape = property(lambda self: self._view.shape)
    dtype = property(lambda self: self._view.dtype)
    ndim = property(lambda self: self._view.ndim)
    size = property(lambda self: self._view.size)
    itemsize = property(lambda self: self._view.itemsize)
    nbytes = property(lambda self: self._view.nbytes)
    strides = property(lambda self: self._view.strides)
    flags = property(lambda self: self._view.flags)

    @property
    def device(self):
        from .cuda import Device

        return Device(self._memory.device_id)

    @property
    def data(self):
        memory = self._memory
        return MemoryPointer(memory, self._view.ctypes.data - memory.ptr if memory.size else 0)

    @property
    def T(self):
        return self.transpose()

    @property
    def base(self):
        return None

    def __len__(self):
        return len(self._view)

    def __repr__(self):
        refuse_during_capture("copying device memory to the host (to print an array)")
        return f"{numpy.array2string(self._view, separator=', ', prefix='array(')} on cuda:{self._memory.device_id}"

    __str__ = __repr__

    # ----- to the host, only when asked ---------------------------------------------------------
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None):
        refuse_during_capture("copying device memory to the host")
        host = numpy.array(self._view, order=order)
        if out is not None:
            out[...] = host
            return out
        return host

    def set(self, arr, stream=None):
        refuse_during_capture("copying host memory to the device")
        self._view[...] = arr

    def item(self):
        refuse_during_capture("reading a device value on the host")
        return self._view.item()

    def tolist(self):
        return self.get().tolist()

    def __bool__(self):
        if self.size != 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous.")
        return bool(self.item())

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __complex__(self):
        return complex(self.item())

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    # ----- views and copies ---------------------------------------------------------------------
    def __getitem__(self, key):
        view_key, advanced, arrays = _index(key)
        if not advanced:
            result = self._view[view_key]
            if not isinstance(result, numpy.ndarray):  # an integer for every axis: a 0-d view
                result = self._view[view_key + (Ellipsis,) if isinstance(view_key, tuple) else (view_key, Ellipsis)]
            return ndarray._over(result, self._memory)
        _refuse_mask(arrays)
        return _run(_getitem, (self._view, view_key), {}, [self, *arrays], label="advanced indexing (a gather)")

    def __setitem__(self, key, value):
        view_key, _, arrays = _index(key)
        _refuse_mask(arrays)
        operand = _operand(value)
        sources = [self, *arrays] + ([value] if isinstance(value, ndarray) else [])
        _run(_setitem, (self._view, view_key, operand), {}, sources, label="__setitem__")

    def reshape(self, *shape, order="C"):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return _run(_reshape, (self._view, shape, order), {}, [self], label="reshape")

    def ravel(self, order="C"):
        return _run(_ravel, (self._view, order), {}, [self], label="ravel")

    def flatten(self):
        return _run(_flatten, (self._view,), {}, [self], label="flatten")

    def transpose(self, *axes):
        return ndarray._over(self._view.transpose(*axes), self._memory)

    def swapaxes(self, axis1, axis2):
        return ndarray._over(self._view.swapaxes(axis1, axis2), self._memory)

    def squeeze(self, axis=None):
        return ndarray._over(self._view.squeeze(axis), self._memory)

    def view(self, dtype=None):
        return ndarray._over(self._view.view(dtype) if dtype is not None else self._view.view(), self._memory)

    def copy(self, order="C"):
        return _run(_copy, (self._view, order), {}, [self], label="copy")

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and numpy.dtype(dtype) == self.dtype:
            return self
        return _run(_astype, (self._view, numpy.dtype(dtype), order), {}, [self], label="astype")

    def fill(self, value):
        _run(_fill, (self._view, _operand(value)), {}, [self] + ([value] if isinstance(value, ndarray) else []),
             label="fill")

    def __dlpack_device__(self):
        return (2, self._memory.device_id)  # kDLCUDA

    # ----- arithmetic ---------------------------------------------------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _apply(getattr(ufunc, method), inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return _apply(func, args, kwargs)


# What the methods above run, on NumPy views (the real ones eagerly or in a replay, scratch copies in a dry run).
def _getitem(view, key):
    return view[key]


def _setitem(view, key, value):
    view[key] = value


def _reshape(view, shape, order):
    return view.reshape(shape, order=order)


def _ravel(view, order):
    return view.ravel(order=order)


def _flatten(view):
    return view.flatten()


def _copy(view, order):
    return view.copy(order=order)


def _astype(view, dtype, order):
    return view.astype(dtype, order=order)


def _fill(view, value):
    view.fill(value)


def _binary(name, reflected=False):
    ufunc = getattr(numpy, name)
    if reflected:
        return lambda self, other: _apply(ufunc, (other, self), {})
    return lambda self, other: _apply(ufunc, (self, other), {})


def _in_place(name):
    ufunc = getattr(numpy, name)

    def method(self, other):
        _apply(ufunc, (self, other), {"out": self})
        return self

    return method


for _name, _ufunc in [("add", "add"), ("sub", "subtract"), ("mul", "multiply"), ("truediv", "true_divide"),
                      ("floordiv", "floor_divide"), ("mod", "remainder"), ("pow", "power"), ("matmul", "matmul"),
                      ("and", "bitwise_and"), ("or", "bitwise_or"), ("xor", "bitwise_xor"),
                      ("lshift", "left_shift"), ("rshift", "right_shift")]:
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
    setattr(ndarray, f"__r{_name}__", _binary(_ufunc, reflected=True))
    setattr(ndarray, f"__i{_name}__", _in_place(_ufunc))
for _name, _ufunc in [("eq", "equal"), ("ne", "not_equal"), ("lt", "less"), ("le", "less_equal"),
                      ("gt", "greater"), ("ge", "greater_equal")]:
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
ndarray.__neg__ = lambda self: _apply(numpy.negative, (self,), {})
ndarray.__pos__ = lambda self: self.copy()
ndarray.__abs__ = lambda self: _apply(numpy.absolute, (self,), {})
ndarray.__invert__ = lambda self: _apply(numpy.invert, (self,), {})
ndarray.__hash__ = None


def _method(name, required, optional):
    """The method ``name`` computed by NumPy's function, with CuPy's parameters (names and order): a call CuPy's
    would refuse is a TypeError here too."""
    function, kind = getattr(numpy, name), inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature([inspect.Parameter(p, kind) for p in ("self", *required.split())]
                                  + [inspect.Parameter(p, kind, default=None) for p in optional.split()])

    def method(self, *args, **kwargs):
        given = signature.bind(self, *args, **kwargs).arguments
        del given["self"]
        return _apply(function, (self,), given)

    method.__name__ = method.__qualname__ = name
    method.__signature__ = signature
    return method


for _name, _required, _optional in [
        ("sum", "", "axis dtype out keepdims"), ("prod", "", "axis dtype out keepdims"),
        ("mean", "", "axis dtype out keepdims"), ("var", "", "axis dtype out ddof keepdims"),
        ("std", "", "axis dtype out ddof keepdims"), ("max", "", "axis out keepdims"), ("min", "", "axis out keepdims"),
        ("argmax", "", "axis out dtype keepdims"), ("argmin", "", "axis out dtype keepdims"),
        ("all", "", "axis out keepdims"), ("any", "", "axis out keepdims"), ("cumsum", "", "axis dtype out"),
        ("clip", "", "min max out"), ("round", "", "decimals out"), ("nonzero", "", ""), ("dot", "b", "out"),
        ("take", "indices", "axis out"), ("repeat", "repeats", "axis"), ("argsort", "", "axis kind")]:
    setattr(ndarray, _name, _method(_name, _required, _optional))


def _sort(self, axis=-1, kind=None):
    """In place, as CuPy's (NumPy's function returns a sorted copy)."""
    self[...] = _apply(numpy.sort, (self,), {"axis": axis, "kind": kind})


ndarray.sort = _sort


# ----- between the wrappers and NumPy --------------------------------------------------------------
def _check_device(array):
    current = current_device_id()
    if array._memory.device_id != current:
        raise ValueError(f"Array device must be same as the current device: array device = "
                         f"{array._memory.device_id} while current = {current}")
    return array._view


def _operand(value):
    """A NumPy view for a device array on the current device; scalars pass; host arrays are refused."""
    if isinstance(value, ndarray):
        return _check_device(value)
    if isinstance(value, (numpy.ndarray, list, tuple)) or (hasattr(value, "__array_interface__")
                                                            and not isinstance(value, numpy.generic)):
        _reject_host(value)
    return value


def _argument(value):
    """``_operand`` for function arguments, which may be sequences of arrays (concatenate, stack)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_argument(v) for v in value)
    return _operand(value)


def _index(key):
    """A NumPy index for ``key`` (device index arrays unwrapped), whether it is advanced indexing, and the device
    arrays in it. A host index array is copied to the device, as CuPy does: refused during a capture."""
    parts = key if isinstance(key, tuple) else (key,)
    converted, advanced, arrays = [], False, []
    for part in parts:
        if isinstance(part, ndarray):
            arrays.append(part)
            part, advanced = _check_device(part), True
        elif isinstance(part, (list, numpy.ndarray)):
            if recording() is not None:
                refuse_during_capture("copying host memory to the device (a host index array)")
            advanced = True
        converted.append(part)
    return (tuple(converted) if isinstance(key, tuple) else converted[0]), advanced, arrays


def _refuse_mask(arrays):
    if any(a.dtype == numpy.bool_ for a in arrays) and recording() is not None:
        refuse_during_capture("reading a device value on the host (indexing with a boolean mask: CuPy copies the "
                              "count of its True values to the host)")


def _to_device(result):
    """A fresh device array holding ``result`` (a NumPy array or scalar computed on the host).

    During a capture the values are written by the graph (as a kernel computing them would be): a copy taken now.
    """
    result = numpy.asarray(result)
    capture = recording()
    array = ndarray(result.shape, result.dtype)
    if capture is None:
        array._view[...] = result
    else:
        values, view = result.copy(), array._view
        capture.add("writing values computed at capture time", lambda: view.__setitem__(Ellipsis, values), [array])
    return array


def _wrap(result, sources):
    if isinstance(result, (tuple, list)):
        return type(result)(_wrap(r, sources) for r in result)
    if isinstance(result, (numpy.ndarray, numpy.generic)):
        for source in sources:
            if isinstance(result, numpy.ndarray) and result.size and numpy.may_share_memory(result, source._view):
                return ndarray._over(result, source._memory)
        return _to_device(result)
    return result


def _sources(values):
    found = []
    for value in values:
        if isinstance(value, ndarray):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(_sources(value))
    return found


def _run(function, args, kwargs, sources, out=None, label=None):
    """``function`` over unwrapped arguments (NumPy views of ``sources``): run now, or recorded by a capture."""
    capture = recording()
    if capture is not None:
        return capture.record_call(function, args, kwargs, sources, out, label)
    with numpy.errstate(all="ignore"):  # a GPU raises no floating-point warnings
        result = function(*args, **kwargs)
    if out is not None:
        return out
    return _wrap(result, sources)


def _apply(function, args, kwargs):
    """``function`` (a NumPy ufunc or function) over device arrays, the result on the device."""
    out = kwargs.get("out")
    unwrapped = [_argument(a) for a in args]
    kw = {k: (_argument(v) if k != "out" else v) for k, v in kwargs.items()}
    if out is not None:
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            if not isinstance(o, ndarray):
                _reject_host(o)
        kw["out"] = tuple(_check_device(o) for o in outs) if isinstance(out, tuple) else _check_device(out)
    return _run(function, unwrapped, kw, _sources(args) + _sources(kwargs.values()), out)


# CuPy's ``cupy._core._routines_linalg`` (cuBLAS compute types), importable by that name.
from . import _routines_linalg  # noqa: E402

sys.modules[__name__ + "._routines_linalg"] = _routines_linalg
