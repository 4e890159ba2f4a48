"""The stand-in's arrays: device memory from the CUDA emulator, NumPy computing on it.

An ``ndarray`` is a NumPy view of emulated device memory (guarded and
garbage-filled, see ``cuda_emulator.allocate``) plus the device it lives on.
Operations unwrap their arguments, check that every array is on the current
device (as CuPy's kernels do), run NumPy on the views and put any new result
in fresh device memory. As in CuPy, NumPy arrays are refused where device
arrays are expected, and nothing converts a device array to the host
implicitly.
"""

import ctypes
import threading
import weakref

import numpy

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


def capturing_stream():
    """The stream capturing a graph on this thread, or None."""
    return getattr(_state, "capturing", None)


def set_capturing_stream(stream):
    _state.capturing = stream


def refuse_during_capture(what):
    stream = capturing_stream()
    if stream is not None:
        from .cuda.runtime import CUDARuntimeError

        raise CUDARuntimeError(f"cudaErrorStreamCaptureUnsupported: {what} is not permitted while stream "
                               f"{stream!r} captures a graph (CUDA would invalidate the capture)")


# ----- memory ---------------------------------------------------------------------------------
class OutOfMemoryError(MemoryError):
    """CuPy's error for an allocation beyond the pool's limit or the device's memory."""

    def __init__(self, size, total, limit=0):
        message = f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes"
        message += f", limit set to: {limit:,} bytes)." if limit else ")."
        super().__init__(message)


class Memory:
    """One device allocation; returned to its pool when the last array over it is gone."""

    def __init__(self, pool, device_id, address, nbytes):
        self.device_id, self.ptr, self.size = device_id, address, nbytes
        weakref.finalize(self, pool._release, device_id, address, nbytes)

    def host_view(self):
        """A NumPy byte array over the allocation (empty for 0 bytes)."""
        if not self.size:
            return numpy.empty(0, numpy.uint8)
        return numpy.frombuffer((ctypes.c_char * self.size).from_address(self.ptr), dtype=numpy.uint8)


class MemoryPointer:
    def __init__(self, mem, ptr):
        self.mem, self.ptr = mem, ptr
        self.device_id = mem.device_id


class MemoryPool:
    """CuPy's default memory pool: freed blocks are kept for reuse (by size), an optional limit."""

    def __init__(self):
        self._lock = threading.Lock()
        self._used, self._cached, self._limit = {}, {}, {}
        self._free = {}  # (device, nbytes) -> [address]

    def malloc(self, nbytes):
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
        return Memory(self, device, address, nbytes)

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


# ----- arrays ---------------------------------------------------------------------------------
def _reject_host(value):
    raise TypeError(f"Unsupported type {type(value)}")


class ndarray:
    """An array on an emulated CUDA device (CuPy's ``cupy.ndarray``)."""

    __array_priority__ = 100

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        dtype = numpy.dtype(dtype)
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else (int(shape),)
        if memptr is not None:
            raise NotImplementedError("the stand-in's ndarray takes no memptr")
        nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize
        memory = _pool.malloc(nbytes)
        view = memory.host_view().view(dtype).reshape(shape, order=order)
        self._set(view, memory)

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
        return MemoryPointer(self._memory, self._view.__array_interface__["data"][0] if self.size else 0)

    @property
    def T(self):
        return self.transpose()

    @property
    def base(self):
        return None

    def __len__(self):
        return len(self._view)

    def __repr__(self):
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

    def set(self, array, stream=None):
        refuse_during_capture("copying host memory to the device")
        self._view[...] = array

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
        view_key, advanced = _index(key)
        result = self._view[view_key]
        if not advanced:
            if not isinstance(result, numpy.ndarray):  # an integer for every axis: a 0-d view
                result = self._view[view_key + (Ellipsis,) if isinstance(view_key, tuple) else (view_key, Ellipsis)]
            return ndarray._over(result, self._memory)
        return _to_device(result)

    def __setitem__(self, key, value):
        view_key, _ = _index(key)
        self._view[view_key] = _operand(value)

    def reshape(self, *shape, order="C"):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return _view_or_copy(self._view.reshape(shape, order=order), self)

    def ravel(self, order="C"):
        return _view_or_copy(self._view.ravel(order=order), self)

    def flatten(self):
        return _to_device(self._view.flatten())

    def transpose(self, *axes):
        return ndarray._over(self._view.transpose(*axes), self._memory)

    def swapaxes(self, a, b):
        return ndarray._over(self._view.swapaxes(a, b), self._memory)

    def squeeze(self, axis=None):
        return ndarray._over(self._view.squeeze(axis), self._memory)

    def view(self, dtype=None):
        return ndarray._over(self._view.view(dtype) if dtype is not None else self._view.view(), self._memory)

    def copy(self, order="C"):
        return _to_device(self._view.copy(order=order))

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and numpy.dtype(dtype) == self.dtype:
            return self
        return _to_device(self._view.astype(dtype, order=order))

    def fill(self, value):
        self._view.fill(_operand(value))

    def __dlpack_device__(self):
        return (2, self._memory.device_id)  # kDLCUDA

    # ----- arithmetic ---------------------------------------------------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _apply(getattr(ufunc, method), inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return _apply(func, args, kwargs)


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
for _name in ("sum", "prod", "mean", "var", "std", "max", "min", "argmax", "argmin", "all", "any", "cumsum",
              "clip", "round", "nonzero", "dot", "take", "repeat", "sort", "argsort"):
    setattr(ndarray, _name, (lambda name: lambda self, *a, **k: _apply(getattr(numpy, name), (self, *a), k))(_name))


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
    """A NumPy index for ``key`` (device index arrays unwrapped) and whether it is advanced indexing."""
    parts = key if isinstance(key, tuple) else (key,)
    converted, advanced = [], False
    for part in parts:
        if isinstance(part, ndarray):
            part, advanced = _check_device(part), True
        elif isinstance(part, (list, numpy.ndarray)):
            advanced = True
        converted.append(part)
    return (tuple(converted) if isinstance(key, tuple) else converted[0]), advanced


def _to_device(result):
    """A fresh device array holding ``result`` (a NumPy array or scalar)."""
    result = numpy.asarray(result)
    array = ndarray(result.shape, result.dtype)
    array._view[...] = result
    return array


def _view_or_copy(result, source):
    if result.size and numpy.may_share_memory(result, source._view):
        return ndarray._over(result, source._memory)
    return _to_device(result)


def _wrap(result, sources):
    if isinstance(result, tuple):
        return tuple(_wrap(r, sources) for r in result)
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
    with numpy.errstate(all="ignore"):  # a GPU raises no floating-point warnings
        result = function(*unwrapped, **kw)
    if out is not None:
        return out
    return _wrap(result, _sources(args) + _sources(kwargs.values()))
