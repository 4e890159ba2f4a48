"""A stand-in for CuPy that runs on the CPU: nnaccel's test infrastructure, never shipped.

Put the folder above this package first on ``PYTHONPATH`` and ``import cupy``
finds it instead of CuPy, for any script or ``nnaccel`` command:

    PYTHONPATH=tests/cuda_standin nnaccel train --device cuda

Arrays live in emulated device memory and compute with NumPy; ``RawModule``
kernels are compiled by the host C++ compiler and run by the CUDA emulator
(``cuda_emulator``, beside this package), which schedules the threads of a
block concurrently and reports what a GPU would get wrong. Like CuPy, the
stand-in refuses implicit host conversion (``numpy.asarray(device_array)``)
and mixing NumPy arrays with device arrays (``TypeError``), and an array must
be used on the device it lives on. Memory comes from CuPy's allocator API
(``cupy.cuda.alloc``, ``set_allocator``, ``using_allocator``, ``ndarray(...,
memptr=...)``), and ``Stream.begin_capture``/``end_capture`` capture CUDA
graphs with CUDA's rules (see ``_core`` and ``cuda/graph.py``): captured work
runs only when the graph is launched, and what CUDA refuses while capturing
raises and invalidates the capture. ``CUPY_STANDIN_DEVICES`` (default 2) and
``CUPY_STANDIN_SMS`` (multiprocessors per device, default 2, so that
grid-stride loops take several passes) shape the emulated machine.
"""

import builtins

import numpy

from . import cuda, random  # noqa: F401  (CuPy's submodules)
from ._core import get_default_memory_pool, ndarray  # noqa: F401
from ._core import _apply, _operand, _to_device
from . import _routines_linalg

__version__ = "14.0.0+cpu.standin"

# Dtypes and constants are NumPy's, as in CuPy.
for _name in ("bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
              "float32", "float64", "complex64", "complex128", "intp", "dtype", "finfo", "iinfo", "newaxis", "pi",
              "inf", "nan", "e", "result_type", "can_cast", "promote_types", "isscalar", "ndim", "shape"):
    globals()[_name] = getattr(numpy, _name)


def get_default_pinned_memory_pool():
    return None


def get_array_module(*args):
    import sys

    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else numpy


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    """A host copy of a device array (other values pass through ``numpy.asarray``)."""
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return numpy.asarray(a, order=order)


def asarray(a, dtype=None, order=None, *, blocking=False):
    """``a`` on the current device: host data is copied over, a device array of that dtype is kept."""
    if isinstance(a, ndarray):
        if (dtype is None or numpy.dtype(dtype) == a.dtype) and (order is None or a.flags[f"{order}_CONTIGUOUS"]):
            _operand(a)  # on the current device
            return a
        return a.astype(dtype or a.dtype, order=order or "K")
    if hasattr(a, "__dlpack_device__") and not hasattr(a, "__array_interface__"):
        return from_dlpack(a)
    from ._core import refuse_during_capture

    refuse_during_capture("copying host memory to the device")
    return _to_device(numpy.asarray(a, dtype=dtype, order=order))


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        result = obj.astype(dtype or obj.dtype, order=order) if copy else asarray(obj, dtype)
        return result
    return asarray(numpy.array(obj, dtype=dtype, order=order, ndmin=ndmin))


def ascontiguousarray(a, dtype=None):
    return asarray(a, dtype=dtype, order="C")


def empty(shape, dtype=float, order="C"):
    return ndarray(shape, dtype, order=order)


def empty_like(prototype, dtype=None, order="K", subok=None, shape=None):
    a = prototype
    return ndarray(a.shape if shape is None else shape, dtype or a.dtype,
                   order="F" if order in "KA" and a.flags.f_contiguous and not a.flags.c_contiguous else "C")


def full(shape, fill_value, dtype=None, order="C"):
    result = ndarray(shape, dtype if dtype is not None else numpy.asarray(fill_value).dtype, order=order)
    result.fill(fill_value)
    return result


def full_like(a, fill_value, dtype=None):
    result = empty_like(a, dtype)
    result.fill(fill_value)
    return result


def zeros(shape, dtype=float, order="C"):
    return full(shape, 0, dtype, order)


def ones(shape, dtype=float, order="C"):
    return full(shape, 1, dtype, order)


def zeros_like(a, dtype=None):
    return full_like(a, 0, dtype)


def ones_like(a, dtype=None):
    return full_like(a, 1, dtype)


def arange(start, stop=None, step=1, dtype=None):
    return _to_device(numpy.arange(start, stop, step, dtype=dtype) if stop is not None
                      else numpy.arange(start, dtype=dtype))


def shares_memory(a, b, max_work=None):
    """As CuPy's: the exact answer (``max_work`` None) is computed on the device (a sort of every element's
    address) and read on the host, which a capture refuses; ``"MAY_SHARE_BOUNDS"`` compares bounds on the host."""
    from ._core import refuse_during_capture

    if a is b and a.size != 0:
        return True
    if max_work == "MAY_SHARE_BOUNDS":
        return _apply(numpy.may_share_memory, (a, b), {})
    if max_work not in (None, "MAY_SHARE_EXACT"):
        raise NotImplementedError("Not supported for integer `max_work`.")
    refuse_during_capture("reading a device value on the host (shares_memory: CuPy computes it on the device)")
    return bool(numpy.shares_memory(_operand(a), _operand(b)))


def from_dlpack(array):
    """A device array from another framework's CUDA array (DLPack); host arrays are refused like CuPy's."""
    kind, device_id = array.__dlpack_device__()
    if isinstance(array, ndarray):
        return array
    if kind != 2:
        raise TypeError(f"from_dlpack: the array is on DLPack device type {kind}, not a CUDA device (2)")
    raise TypeError("the CuPy stand-in takes DLPack arrays only from itself")


def _numpy_function(name):
    function = getattr(numpy, name)

    def call(*args, **kwargs):
        return _apply(function, args, kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``numpy.{name}`` on device arrays."
    return call


def matmul(a, b, /, *, out=None, casting="same_kind", dtype=None):
    """``numpy.matmul`` on device arrays; float32 inputs rounded first as the compute type set with
    ``cupy._core._routines_linalg.set_compute_type`` lets cuBLAS round them (TF32, in 2-D products)."""
    a_op, b_op = _operand(a), _operand(b)
    bits = _routines_linalg.mantissa_bits(numpy.result_type(a_op.dtype, b_op.dtype), builtins.max(a_op.ndim, b_op.ndim))
    if bits is not None:
        a, b = (_apply(_routines_linalg.round_mantissa, (operand, bits), {}) for operand in (a, b))
    return _apply(numpy.matmul, (a, b), {"casting": casting, "dtype": dtype, **({} if out is None else {"out": out})})


# NumPy 2.4's functions that CuPy 13.6 (the oldest CuPy nnaccel takes) lacks, from its cupy-cuda12x wheel:
# served here, code calling them would pass CI and fail on a GPU with CuPy 13.
NOT_IN_CUPY_13 = frozenset("""
    acos acosh apply_over_axes asin asinh asmatrix astype atan atan2 atanh bitwise_count bitwise_invert
    bitwise_left_shift bitwise_right_shift block bmat busday_count busday_offset concat cumulative_prod
    cumulative_sum datetime_as_string datetime_data einsum_path errstate frompyfunc fromregex geomspace
    get_include getbufsize geterr geterrcall histogram_bin_edges info insert is_busday isdtype isnat
    matrix_transpose matvec nanpercentile nanquantile ndenumerate nested_iters permute_dims polyder polydiv
    polyint pow put_along_axis setbufsize seterr seterrcall show_runtime spacing trapezoid unique_all
    unique_counts unique_inverse unique_values unstack vecdot vecmat""".split())
# NumPy 2.4's callables that CuPy 14.2 lacks too: types (strings, dates, objects, long doubles, matrices) and
# host-only machinery.
NOT_IN_CUPY = frozenset("""
    busdaycalendar bytes_ character clongdouble complex256 datetime64 flexible float128 longdouble matrix memmap
    nditer object_ recarray record str_ test timedelta64 void""".split())


def __getattr__(name):
    """Every other NumPy function or ufunc that CuPy 13 has too, on device arrays (``cupy.exp``,
    ``cupy.stack``, ...)."""
    if name in NOT_IN_CUPY_13:
        raise AttributeError(f"module 'cupy' has no attribute {name!r} (CuPy 13, which nnaccel supports, lacks it)")
    if name in NOT_IN_CUPY:
        raise AttributeError(f"module 'cupy' has no attribute {name!r} (CuPy lacks it)")
    if not name.startswith("_") and callable(getattr(numpy, name, None)):
        function = _numpy_function(name)
        globals()[name] = function
        return function
    raise AttributeError(f"module 'cupy' (the CPU stand-in) has no attribute {name!r}")


class RawKernel:
    """A CUDA kernel, called like CuPy's: ``kernel(grid, block, args)``.

    ``RawKernel(code, name, options=())`` compiles ``code`` as CuPy's does (on first use); ``RawModule.get_function``
    returns one of its module. During a graph capture on the current stream a call is recorded, not run: its
    configuration and arguments are checked now, scalars are kept by value and arrays by address, as CUDA keeps a
    kernel node's parameters.
    """

    def __init__(self, code, name, options=(), backend="nvrtc", translate_cucomplex=False, *,
                 enable_cooperative_groups=False, jitify=False):
        self._module = code if isinstance(code, RawModule) else RawModule(code=code, options=options,
                                                                        backend=backend)
        self.name = name

    @property
    def code(self):
        return self._module.code

    @property
    def kernel(self):
        return self._module._compiled().get_function(self.name)

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None, enable_cooperative_groups=False):
        import cuda_emulator

        from . import _core
        from .cuda.driver import CUDADriverError

        if not isinstance(args, tuple):
            raise TypeError(f"kernel arguments must be a tuple, got {type(args).__name__}")
        arguments = [_kernel_argument(value, index, self.name) for index, value in enumerate(args)]
        capture = _core.recording(stream)
        try:
            kernel = self.kernel
            if capture is None:
                kernel.launch(grid, block, arguments, shared_mem)
                return
            grid, block = kernel.validate(grid, block, arguments, shared_mem)
        except cuda_emulator.LaunchError as error:
            if capture is not None and capture.invalidated is None:  # a failed call in a capture invalidates it
                capture.invalidated = f"the refused launch of kernel {self.name}"
            raise CUDADriverError(str(error)) from None

        def run():
            try:
                kernel.launch(grid, block, arguments, shared_mem)
            except cuda_emulator.LaunchError as error:
                raise CUDADriverError(str(error)) from None

        capture.add(f"kernel {self.name} <<<{grid}, {block}>>>", run, [a for a in args if isinstance(a, ndarray)])


def _kernel_argument(value, index, kernel):
    """A kernel argument as CuPy passes it: arrays by device pointer, Python ints as long long,
    floats as double, bools as bool; NumPy scalars keep their type (an 8-byte 0 is a null pointer)."""
    import cuda_emulator

    if value is None:  # CuPy 13 puts a null entry in the argument array itself: the kernel reads garbage
        raise TypeError(f"{kernel} argument {index}: None, which CuPy 13 passes as a garbage pointer (cupy#9046); "
                        f"pass a null pointer as numpy.uint64(0)")
    if isinstance(value, ndarray):
        _operand(value)  # on the current device, or ValueError
        memory = value._memory
        return cuda_emulator.Argument.to_array(value.data.ptr, value.dtype, (memory.ptr, memory.size) if memory.size
                                               else None, f"a {value.dtype} array of shape {value.shape}")
    if isinstance(value, numpy.ndarray):
        raise TypeError(f"{kernel} argument {index}: unsupported type {type(value)} (a host array; pass a device "
                        f"array)")
    if isinstance(value, bool):
        value = numpy.bool_(value)
    elif isinstance(value, int):
        value = numpy.int64(value)
    elif isinstance(value, float):
        value = numpy.float64(value)
    if not isinstance(value, numpy.generic):
        raise TypeError(f"{kernel} argument {index}: unsupported type {type(value)}")
    return cuda_emulator.Argument.scalar(value)


class RawModule:
    """CUDA source compiled on first use (by the host compiler, for the emulator). The arguments are
    checked as CuPy's RawModule checks them: keywords only, ``options`` a tuple, and name expressions
    only with a C++ standard among the options."""

    def __init__(self, *, code=None, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, jitify=False):
        if (code is None) == (path is None):
            raise TypeError("Exactly one of `code` and `path` keyword arguments must be given.")
        if not isinstance(options, tuple):
            raise TypeError(f"Argument 'options' has incorrect type (expected tuple, got {type(options).__name__})")
        if name_expressions is not None and not any("-std=c++" in option for option in options):
            raise ValueError("need to specify C++ standard for compiling template code")
        if code is None:
            with open(path) as handle:
                code = handle.read()
        self.code, self.options, self.name_expressions = code, tuple(options), tuple(name_expressions or ())
        self._module = None

    def _compiled(self):
        if self._module is None:
            import cuda_emulator

            from .cuda.compiler import CompileException

            try:
                self._module = cuda_emulator.Module(self.code, self.options, self.name_expressions)
            except cuda_emulator.CompileError as error:
                raise CompileException(str(error)) from None
        return self._module

    def get_function(self, name):
        self._compiled().get_function(name)  # an unknown name fails here, as in CuPy
        return RawKernel(self, name)

