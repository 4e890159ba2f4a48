"""A CPU runtime for CUDA C: nnaccel's kernels run, and fail as on a GPU, without one.

``Module(code, options, name_expressions)`` compiles kernel source, the same
text CuPy hands to NVRTC, with the host C++ compiler and ``cuda_emulator.h``
in front of it; ``Module.get_function(name).launch(grid, block, args)`` runs
one kernel over a grid (runtime.cpp says how the threads are scheduled).
Arguments arrive as the driver gets them, an array of pointers to their
values, and each is checked against the kernel's parameter type first: a
4-byte int where the kernel takes ``long long``, a float64 array for a
``float*``, a pointer misaligned for its type, a grid or block beyond the
hardware's limits are launch errors.
Device memory comes from ``allocate``: each allocation ends where a guard
region starts, so a kernel reading or writing past it fails with a report
naming the argument and how far out it went.

Compiled modules are cached on disk by a hash of all that goes into them
(source text, options, name expressions, the C++ files of this folder, the
compiler's version): an edited kernel recompiles, an unchanged one loads.

Environment: ``CUDA_EMULATOR_SEED`` (the base seed of the schedules; random
unless set, and printed with every failure), ``CUDA_EMULATOR_TIMEOUT``
(seconds one launch may run, default 120), ``CUDA_EMULATOR_CACHE`` (the cache
folder, default ``~/.cache/nnaccel-cuda-emulator``), ``CUDA_EMULATOR_UCONTEXT``
(switch threads with ucontext, as on machines other than x86-64).
"""

import ctypes
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy

HERE = Path(__file__).resolve().parent
SOURCES = ("cuda_emulator.h", "cuda_emulator_entry.h", "runtime.cpp")
MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK = (1024, 1024, 64)
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_STATIC_SHARED = 48 * 1024
BASE_SEED = int(os.environ.get("CUDA_EMULATOR_SEED") or int.from_bytes(os.urandom(4), "little"))
TIMEOUT_S = float(os.environ.get("CUDA_EMULATOR_TIMEOUT", 120))
COMPILER_FLAGS = ("-O2", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
                  "-U_FORTIFY_SOURCE")
stats = {"compiles": 0, "launches": 0}  # compiler runs and launches in this process (the cache tests read it)
_LAUNCH_LOCK = threading.Lock()  # one launch at a time: the runtime's scheduler state is global


class CompileError(Exception):
    """The host compiler rejected a module (the message holds its output)."""


class LaunchError(RuntimeError):
    """A launch a GPU would refuse or fail; ``code`` is the CUDA driver error it stands for."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass(frozen=True)
class Argument:
    """One kernel argument as the driver sees it: the bytes of its C value, and what they are.

    ``dtype`` is a scalar's type, or the element type of the array a pointer
    points into (a null pointer comes as an 8-byte integer 0: ``is_null``); ``allocation`` is ``(address,
    nbytes)`` of that array's device allocation.
    """

    value: bytes
    pointer: bool
    dtype: numpy.dtype = None
    allocation: tuple = None
    what: str = ""

    @classmethod
    def to_array(cls, address, dtype, allocation, what):
        return cls(ctypes.c_void_p(address).value.to_bytes(8, "little") if address else bytes(8), True,
                   numpy.dtype(dtype), allocation, what)

    def is_null(self):
        """An 8-byte integer 0: what a pointer parameter reads as a null pointer (the driver copies bytes)."""
        return not self.pointer and self.dtype.kind in "iu" and len(self.value) == 8 and not any(self.value)

    @classmethod
    def scalar(cls, value):
        value = value if isinstance(value, numpy.generic) else numpy.asarray(value)[()]
        return cls(value.tobytes(), False, value.dtype, None, f"{value.dtype} {value}")


# ----- building -------------------------------------------------------------------------------
def _compiler():
    found = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if found is None:
        raise CompileError("no host C++ compiler (g++ or c++) on PATH: the CUDA emulator needs one")
    return found


@functools.lru_cache(maxsize=None)
def _compiler_identity():
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    return compiler, version


def cache_dir():
    folder = Path(os.environ.get("CUDA_EMULATOR_CACHE") or Path.home() / ".cache" / "nnaccel-cuda-emulator")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _build(stem, text, flags, link=()):
    """The shared library built from ``text``: from the cache, or compiled into it (atomically)."""
    compiler, version = _compiler_identity()
    key = hashlib.sha256()
    for part in (text, *flags, *map(str, link), version, *((HERE / s).read_text() for s in SOURCES)):
        key.update(part.encode())
        key.update(b"\0")
    library = cache_dir() / f"{stem}-{key.hexdigest()[:20]}.so"
    if library.exists():
        return library
    with tempfile.TemporaryDirectory(dir=cache_dir()) as work:
        source = Path(work) / f"{stem}.cpp"
        source.write_text(text)
        output = Path(work) / library.name
        command = [compiler, *COMPILER_FLAGS, *flags, "-I", str(HERE), str(source), "-o", str(output), *map(str, link)]
        run = subprocess.run(command, capture_output=True, text=True)
        stats["compiles"] += 1
        if run.returncode:
            raise CompileError(f"the host compiler rejected the kernel source:\n{run.stderr.strip()}")
        os.replace(output, library)
    return library


class _Result(ctypes.Structure):
    _fields_ = [("status", ctypes.c_int), ("signal", ctypes.c_int), ("write", ctypes.c_int),
                ("address", ctypes.c_ulonglong), ("shared_array", ctypes.c_int), ("block", ctypes.c_uint * 3),
                ("thread", ctypes.c_uint * 3),
                ("message", ctypes.c_char * 4096)]


class _Param(ctypes.Structure):
    _fields_ = [("pointer", ctypes.c_int), ("kind", ctypes.c_int), ("size", ctypes.c_int),
                ("is_const", ctypes.c_int), ("align", ctypes.c_int)]


class _KernelInfo(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("invoke", ctypes.c_void_p), ("count", ctypes.c_int),
                ("params", ctypes.POINTER(_Param))]


@functools.lru_cache(maxsize=None)
def runtime():
    """The runtime library (built once), its functions typed for ctypes."""
    flags = ("-std=c++17",) + (("-DCUEMU_UCONTEXT",) if os.environ.get("CUDA_EMULATOR_UCONTEXT") else ())
    path = _build("cuda-emulator-runtime", (HERE / "runtime.cpp").read_text(), flags)
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    size_t, pointer = ctypes.c_size_t, ctypes.c_void_p
    lib.cuemu_launch.argtypes = [pointer, pointer, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                 ctypes.POINTER(ctypes.c_ulonglong), size_t, ctypes.c_ulonglong, ctypes.c_double,
                                 ctypes.POINTER(_Result)]
    lib.cuemu_alloc.argtypes, lib.cuemu_alloc.restype = [size_t], pointer
    lib.cuemu_free.argtypes = [pointer, size_t]
    lib.cuemu_canary.argtypes, lib.cuemu_canary.restype = [pointer, size_t], size_t
    lib.cuemu_garbage.argtypes = [pointer, size_t, ctypes.c_ulonglong]
    lib.cuemu_guard_sizes.argtypes, lib.cuemu_guard_sizes.restype = [ctypes.POINTER(size_t)] * 2, size_t
    below, above = size_t(), size_t()
    page = lib.cuemu_guard_sizes(ctypes.byref(below), ctypes.byref(above))
    lib.layout = {"page": page, "below": below.value, "above": above.value}
    lib.path = path
    return lib


# ----- device memory ------------------------------------------------------------------------
_garbage_seeds = iter(range(1, 1 << 62))


def allocate(nbytes):
    """The address of ``nbytes`` of fresh device memory (garbage, not zeros); 0 for 0 bytes.

    MemoryError when the host cannot map it.
    """
    if nbytes == 0:
        return 0
    address = runtime().cuemu_alloc(nbytes)
    if not address:
        raise MemoryError(f"the CUDA emulator could not map {nbytes} bytes")
    fill_garbage(address, nbytes)
    return address


def free(address, nbytes):
    if address:
        runtime().cuemu_free(address, nbytes)


def fill_garbage(address, nbytes):
    """Overwrite device memory with seeded garbage, as reused GPU memory holds."""
    if address:
        runtime().cuemu_garbage(address, nbytes, BASE_SEED * 1000003 + next(_garbage_seeds))


# ----- modules and kernels ----------------------------------------------------------------------
_KERNEL_SIGNATURE = re.compile(r"__global__\s+void\s+(\w+)\s*\(([^)]*)\)")
_EXTERN_C_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')
_CTYPES = {("f", 2): "half", ("f", 4): "float", ("f", 8): "double", ("i", 1): "signed char", ("i", 2): "short",
           ("i", 4): "int", ("i", 8): "long long", ("u", 1): "unsigned char", ("u", 2): "unsigned short",
           ("u", 4): "unsigned int", ("u", 8): "unsigned long long", ("b", 1): "bool", ("v", 0): "void"}


@dataclass(frozen=True)
class Param:
    name: str
    pointer: bool
    kind: str
    size: int
    is_const: bool
    align: int  # a pointer's: the bytes its pointee is aligned to

    @property
    def ctype(self):
        base = _CTYPES.get((self.kind, self.size), f"{self.size}-byte type")
        return f"{'const ' if self.is_const else ''}{base}*" if self.pointer else base

    def accepts(self, dtype):
        """Whether values of ``dtype`` are what this parameter (or its pointee) holds, byte for byte."""
        if self.kind in "vs":
            return self.kind == "v" or dtype.itemsize == self.size
        kinds = {"f": "f", "i": "iu", "u": "iu", "b": "b"}[self.kind]
        return dtype.kind in kinds and dtype.itemsize == self.size


def _parameter_names(code):
    """{kernel name: [parameter names]} read from the kernel signatures in ``code``."""
    names = {}
    for kernel, params in _KERNEL_SIGNATURE.findall(code):
        names[kernel] = [re.findall(r"\w+", p)[-1] if re.findall(r"\w+", p) else "?" for p in params.split(",")]
    return names


def _symbols(library, demangle):
    listing = subprocess.run(["readelf", "-sW", *(["-C"] if demangle else []), str(library)], capture_output=True,
                             text=True)
    if listing.returncode:
        raise CompileError(f"readelf could not list the symbols of {library}: {listing.stderr.strip()}")
    rows = [line.split(None, 7) for line in listing.stdout.splitlines()]
    return [row for row in rows if len(row) == 8 and row[0].rstrip(":").isdigit()]


def _shared_arrays(library):
    """The library's ``__shared__`` arrays, ``[(function, variable, offset, bytes, canary bytes)]``, offsets from
    its load address: its writable function-local statics (device code has no others), which the Itanium ABI
    names ``_ZZ<function>E<variable>``; each gets a canary up to the next object or page."""
    sections = subprocess.run(["readelf", "-SW", str(library)], capture_output=True, text=True).stdout
    writable = {int(index) for index, flags in re.findall(r"\[\s*(\d+)\]\s+\.(?:bss|data)\s+\S+\s+\S+\s+\S+\s+\S+"
                                                         r"\s+\S+\s+(\S+)", sections) if "W" in flags}
    arrays, starts, anchor = {}, set(), None
    for raw, readable in zip(_symbols(library, False), _symbols(library, True)):
        value, size, kind, section, name = int(raw[1], 16), int(raw[2], 0), raw[3], raw[6], raw[7]
        if kind == "FUNC" and name == "cuemu_kernel_table":
            anchor = value
        if kind == "OBJECT" and section.isdigit() and int(section) in writable:
            starts.add(value)
            if name.startswith("_ZZ"):
                function, _, variable = readable[7].rpartition("::")
                arrays[value] = (function.split("(")[0], variable, value, size)
    found = []
    for function, variable, value, size in sorted(arrays.values(), key=lambda a: a[2]):
        end = value + size
        following = min([start for start in starts if start >= end] + [-(-end // 4096) * 4096])
        found.append((function, variable, value, size, following - end))
    return {"anchor": anchor, "arrays": found}


# C++ standards in order, as g++ spells them: cuda_emulator.h needs C++17.
_STANDARDS = ("98", "03", "0x", "11", "1y", "14", "1z", "17", "2a", "20", "2b", "23", "2c", "26")


def _standard(value):
    """The g++ -std flag for a kernel's -std option: the user's standard from C++17 on, else C++17, which
    the emulator's own header needs (NVRTC compiles a C++14 kernel; so must the emulator). An unknown
    value goes to g++, which names it."""
    found = re.fullmatch(r"(c|gnu)\+\+(\w+)", value)
    if found and found.group(2) in _STANDARDS and _STANDARDS.index(found.group(2)) < _STANDARDS.index("17"):
        return f"-std={found.group(1)}++17"
    return f"-std={value}"


class Module:
    """Kernel source compiled for the CPU: ``get_function(name)`` for each of ``name_expressions``
    (template instantiations such as ``bias_act<float>``) and each ``extern "C"`` kernel."""

    def __init__(self, code, options=(), name_expressions=()):
        if re.search(r"extern\s+__shared__", code):
            raise CompileError("dynamic shared memory (extern __shared__) is not supported by the CUDA emulator")
        expressions = list(dict.fromkeys([*name_expressions, *_EXTERN_C_KERNEL.findall(code)]))
        flags = ["-std=c++17"]
        for option in options:
            if option.startswith(("-std=", "--std=")):
                flags[0] = _standard(option.split("=", 1)[1])
            elif option.startswith(("-D", "-U")):
                flags.append(option)
        entries = "".join(f"CUEMU_ENTRY({i}, {e})\n" for i, e in enumerate(expressions))
        entries += 'extern "C" void cuemu_kernel_table(void) {}\n'  # an anchor for the load address
        text = (f'#include "cuda_emulator.h"\n#line 1 "kernel.cu"\n{code}\n'
                f'#line 1 "cuda_emulator_entry.h"\n#include "cuda_emulator_entry.h"\n{entries}')
        lib = runtime()
        self.path = _build("cuda-emulator-module", text, flags, link=(lib.path,))
        self._lib = ctypes.CDLL(str(self.path))
        symbols_file = self.path.with_suffix(".symbols.json")
        if not symbols_file.exists():
            symbols_file.write_text(json.dumps(_shared_arrays(self.path)))
        symbols = json.loads(symbols_file.read_text())
        base = ctypes.cast(self._lib.cuemu_kernel_table, ctypes.c_void_p).value - symbols["anchor"]
        arrays = [(function, variable, base + offset, size, canary)
                  for function, variable, offset, size, canary in symbols["arrays"]]
        names = _parameter_names(code)
        self._kernels = {}
        for index, expression in enumerate(expressions):
            entry = getattr(self._lib, f"cuemu_kernel_{index}")
            entry.restype = ctypes.POINTER(_KernelInfo)
            info = entry().contents
            base = expression.split("<")[0].strip()
            param_names = names.get(base, [])
            params = [Param(param_names[i] if i < len(param_names) else f"parameter {i}", bool(p.pointer),
                            chr(p.kind), p.size, bool(p.is_const), p.align)
                      for i, p in ((i, info.params[i]) for i in range(info.count))]
            # its own __shared__ arrays, and those of device functions it may call (all of them: ptxas counts
            # those it does call, which the symbol table does not say)
            mine = [a for a in arrays if a[0] == expression or a[0] not in expressions]
            shared = sum(a[3] for a in mine)
            if shared > MAX_STATIC_SHARED:
                raise CompileError(f"{expression} uses {shared} bytes of static shared memory, more than the "
                                   f"{MAX_STATIC_SHARED} a kernel may declare (ptxas: too much shared data)")
            self._kernels[expression] = Kernel(self, expression, info.invoke, params, mine)

    def get_function(self, name):
        if name not in self._kernels:
            raise LaunchError("CUDA_ERROR_NOT_FOUND", f"no kernel {name!r} in this module; it has "
                              f"{', '.join(self._kernels) or 'none'} (a template needs a name expression)")
        return self._kernels[name]


def _dims(value, what):
    dims = tuple(int(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
    if not 1 <= len(dims) <= 3:
        raise LaunchError("CUDA_ERROR_INVALID_VALUE", f"{what} {value!r} has {len(dims)} dimensions; 1 to 3 expected")
    return dims + (1,) * (3 - len(dims))


_launch_numbers = iter(range(1 << 62))


def _offset(arg):
    """How many bytes into its allocation a pointer argument points (0 for a null pointer or a scalar): what
    decides its alignment on a GPU, where allocations start 256-byte aligned (this emulator's end at a guard
    page instead, so their own addresses are less aligned)."""
    if not arg.pointer or not arg.allocation:
        return 0
    return int.from_bytes(arg.value, "little") - arg.allocation[0]


class Kernel:
    """One compiled kernel: its parameters, and ``launch``."""

    def __init__(self, module, name, invoke, params, shared_arrays):
        self.module, self.name, self._invoke, self.params = module, name, invoke, params
        self.shared_arrays = shared_arrays  # (function, variable, address, bytes, canary bytes after it)
        self.shared_bytes = sum(a[3] for a in shared_arrays)
        self._shared = (ctypes.c_ulonglong * max(1, 3 * len(shared_arrays)))(
            *[v for _, _, address, size, canary in shared_arrays for v in (address, size, canary)])

    def _check_configuration(self, grid, block, shared_mem):
        def refuse(message):
            raise LaunchError("CUDA_ERROR_INVALID_VALUE", f"{self.name}: {message}")

        if min(grid) < 1:
            refuse(f"grid {grid} has no blocks: every dimension must be at least 1")
        if min(block) < 1:
            refuse(f"block {block} has no threads: every dimension must be at least 1")
        for axis, size, limit in zip("xyz", grid, MAX_GRID):
            if size > limit:
                refuse(f"grid {grid}: gridDim.{axis} = {size} exceeds the limit {limit}")
        for axis, size, limit in zip("xyz", block, MAX_BLOCK):
            if size > limit:
                refuse(f"block {block}: blockDim.{axis} = {size} exceeds the limit {limit}")
        if numpy.prod(block) > MAX_THREADS_PER_BLOCK:
            refuse(f"block {block} has {numpy.prod(block)} threads, more than {MAX_THREADS_PER_BLOCK}")
        if shared_mem:
            refuse(f"{shared_mem} bytes of dynamic shared memory asked for, but the kernels here declare theirs "
                   f"statically (the emulator has no extern __shared__)")

    def _check_arguments(self, args):
        if len(args) != len(self.params):
            raise LaunchError("CUDA_ERROR_INVALID_VALUE", f"{self.name} takes {len(self.params)} arguments, got "
                              f"{len(args)}")
        for index, (param, arg) in enumerate(zip(self.params, args)):
            where = f"{self.name} argument {index} ({param.ctype} {param.name})"
            if param.pointer and not arg.pointer and not arg.is_null():
                raise LaunchError("CUDA_ERROR_INVALID_VALUE", f"{where} is a pointer, got {arg.what}")
            if not param.pointer and arg.pointer:
                raise LaunchError("CUDA_ERROR_INVALID_VALUE", f"{where} is a value, got {arg.what}")
            if param.pointer and arg.pointer and not param.accepts(arg.dtype):
                raise LaunchError("CUDA_ERROR_INVALID_VALUE", f"{where} got {arg.what}: the kernel would read "
                                  f"its {arg.dtype.itemsize}-byte {arg.dtype} elements as {param.ctype[:-1]}")
            if not param.pointer and not param.accepts(arg.dtype):
                raise LaunchError("CUDA_ERROR_INVALID_VALUE", f"{where} got {arg.what}, {arg.dtype.itemsize} "
                                  f"bytes of {arg.dtype} for a {param.size}-byte {param.ctype}")
            offset = _offset(arg)
            if param.pointer and offset % param.align:
                raise LaunchError("CUDA_ERROR_MISALIGNED_ADDRESS", f"{where} got {arg.what} starting {offset} bytes "
                                  f"into its allocation, not a multiple of the {param.align}-byte alignment of "
                                  f"{param.ctype[:-1].replace('const ', '')}: on a GPU, whose allocations start "
                                  f"256-byte aligned, every access through it is misaligned")

    def validate(self, grid, block, args, shared_mem=0):
        """``(grid, block)`` as three dimensions each, after the checks a launch makes before it runs (what a
        graph capture does instead of launching); LaunchError for a launch a GPU would refuse."""
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        self._check_configuration(grid, block, shared_mem)
        self._check_arguments(args)
        return grid, block

    def launch(self, grid, block, args, shared_mem=0):
        """Run the kernel over ``grid`` blocks of ``block`` threads with ``args`` (Argument values)."""
        grid, block = self.validate(grid, block, args, shared_mem)
        values = [ctypes.create_string_buffer(arg.value, len(arg.value)) for arg in args]
        params = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
        number = next(_launch_numbers)
        seed = (BASE_SEED << 32) ^ number
        result = _Result()
        lib = runtime()
        with _LAUNCH_LOCK:
            stats["launches"] += 1
            status = lib.cuemu_launch(self._invoke, params, (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block),
                                      self._shared, len(self.shared_arrays), seed, TIMEOUT_S,
                                      ctypes.byref(result))
        if status == 0:
            status = self._check_canaries(args, result)
        if status:
            raise LaunchError(*self._report(status, result, args, grid, block, number))

    def _check_canaries(self, args, result):
        """A write before the start of an allocation changes its canary: a fault, found after the launch."""
        for index, arg in enumerate(args):
            if arg.allocation and runtime().cuemu_canary(*arg.allocation):
                result.address, result.write, result.signal = index, 1, -1
                return 1
        return 0

    def _argument(self, index, args):
        return f"argument {index} ({self.params[index].name}: {args[index].what}, {args[index].allocation[1]} bytes)"

    def _where_is(self, address, args):
        """Where ``address`` lies: just past or before which argument's allocation."""
        layout = runtime().layout
        if address < layout["page"] * 16:
            return f"address {address:#x}, a null pointer"
        for index, arg in enumerate(args):
            if not arg.allocation:
                continue
            data, nbytes = arg.allocation
            first = data + nbytes - max(1, -(-nbytes // layout["page"])) * layout["page"]
            if data + nbytes <= address < data + nbytes + layout["above"]:
                return f"byte {address - data} of {self._argument(index, args)}: past its end"
            if first - layout["below"] <= address < data:
                return f"{data - address} bytes before the start of {self._argument(index, args)}"
        return f"address {address:#x}, outside every allocation the kernel was given"

    def _report(self, status, result, args, grid, block, number):
        """``(CUDA error code, message)`` for a failed launch."""
        where = f"in block ({', '.join(map(str, result.block))}), thread ({', '.join(map(str, result.thread))})"
        if status == 1 and result.shared_array >= 0:
            function, variable, _, size, _ = self.shared_arrays[result.shared_array]
            code, where = "CUDA_ERROR_ILLEGAL_ADDRESS", f"in block ({', '.join(map(str, result.block))})"
            message = f"a thread wrote byte {result.address} of __shared__ {variable} in {function}, which has {size}"
        elif status == 1 and result.signal == -1:  # found by the canary check
            code, where = "CUDA_ERROR_ILLEGAL_ADDRESS", "by some thread"
            message = f"wrote before the start of {self._argument(result.address, args)}"
        elif status == 1 and result.signal in (signal.SIGSEGV, signal.SIGBUS):
            verb = {0: "read", 1: "wrote", -1: "accessed"}[result.write]
            code, message = "CUDA_ERROR_ILLEGAL_ADDRESS", f"{verb} {self._where_is(result.address, args)}"
        elif status == 1:
            code = "CUDA_ERROR_ILLEGAL_INSTRUCTION"
            message = f"{signal.Signals(result.signal).name}: an integer division by zero or an illegal instruction"
        elif status == 3:
            code, message = "CUDA_ERROR_LAUNCH_TIMEOUT", f"ran longer than {TIMEOUT_S:g} s (an endless loop?)"
        else:
            message = result.message.decode(errors="replace")
            code = "CUDA_ERROR_ASSERT" if "assertion" in message else "CUDA_ERROR_LAUNCH_FAILED"
        return code, (f"{self.name} <<<{grid}, {block}>>>: {message}, {where} [launch {number} of this process; "
                      f"CUDA_EMULATOR_SEED={BASE_SEED} repeats its schedules]")
