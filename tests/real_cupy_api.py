"""The names and call signatures of the real CuPy's modules, to hold the CuPy stand-in to them.

Run as a script (``python tests/real_cupy_api.py``, the stand-in not on the path), it reads the real
CuPy, then imports the stand-in in its place (a swap no test process should live with afterwards) and
prints, as JSON, what of the stand-in the real CuPy lacks or calls otherwise, and the NumPy callables
the stand-in serves that the real CuPy lacks.

A module is imported where it can be; one whose CUDA library this machine lacks (cuBLAS, NCCL: the
extension links it) is read from its binary instead, where Cython keeps each function's signature as the
first line of its docstring (``gemmEx(intptr_t handle, int transa, ...)``) and each name as a string.
Cython functions without ``__text_signature__`` are read from that docstring line too. Signatures come
back as ``inspect.Signature`` with the C types dropped, or None where none is recorded.
"""

import importlib
import importlib.util
import inspect
import json
import re
import sys
import types
import warnings
from pathlib import Path

import numpy

STANDIN = Path(__file__).resolve().parent / "cuda_standin"
# The stand-in's own names, and classes it makes itself, that the real CuPy has not or makes otherwise (nnaccel
# uses none of them): the emulated machine's shape, the refusals' lists, its bfloat16 helpers, a view of emulated
# memory, errors raised with a message, memory its pool hands out, a generator over NumPy's.
STANDIN_ONLY = {"cupy.NOT_IN_CUPY_13", "cupy.NOT_IN_CUPY", "cupy.cuda.DEVICES", "cupy.cuda.SMS",
                *(f"cupy.{module}.{name}" for module in ("_core._routines_linalg", "cuda.cublas")
                  for name in ("mantissa_bits", "round_mantissa", "to_bfloat16_bits", "from_bfloat16_bits")),
                "cupy.cuda.BaseMemory.host_view", "cupy.cuda.memory.BaseMemory.host_view",
                "cupy.cuda.runtime.CUDARuntimeError", "cupy.cuda.memory.PooledMemory", "cupy.random.Generator"}

# Each stand-in module and the real modules behind it (CuPy serves cublas from cupy_backends, and cupy.cuda.nccl
# re-exports cupy_backends' where NCCL loads).
MODULES = {"cupy": "cupy", "cupy.cuda": "cupy.cuda", "cupy.cuda.runtime": "cupy_backends.cuda.api.runtime",
           "cupy.cuda.driver": "cupy_backends.cuda.api.driver", "cupy.cuda.cublas": "cupy_backends.cuda.libs.cublas",
           "cupy.cuda.nccl": ("cupy.cuda.nccl", "cupy_backends.cuda.libs.nccl"), "cupy.cuda.graph": "cupy.cuda.graph",
           "cupy.cuda.memory": "cupy.cuda.memory", "cupy.cuda.compiler": "cupy.cuda.compiler",
           "cupy._core._routines_linalg": "cupy._core._routines_linalg", "cupy.random": "cupy.random",
           "cupyx.scipy.special": "cupyx.scipy.special", "cupyx.profiler": "cupyx.profiler"}


def parse(text):
    """``inspect.Signature`` of a Cython signature line's parameters (``int device, *, str path=None``)."""
    parameters, kind = [], inspect.Parameter.POSITIONAL_OR_KEYWORD
    for part in filter(None, (p.strip() for p in re.split(r",(?![^()\[\]{}]*[)\]}])", text))):
        part = part.replace("\\*", "*")
        if part == "/":
            parameters = [p.replace(kind=inspect.Parameter.POSITIONAL_ONLY) for p in parameters]
            continue
        if part == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        declaration, has_default, _ = part.partition("=")
        name = declaration.split()[-1]
        if name.startswith("**"):
            parameters.append(inspect.Parameter(name[2:], inspect.Parameter.VAR_KEYWORD))
        elif name.startswith("*"):
            parameters.append(inspect.Parameter(name[1:], inspect.Parameter.VAR_POSITIONAL))
            kind = inspect.Parameter.KEYWORD_ONLY
        else:
            parameters.append(inspect.Parameter(name, kind, default=None if has_default else inspect.Parameter.empty))
    return inspect.Signature(parameters)


def _documented(qualname, doc):
    """The signature in the first line of a Cython docstring (``[Class.]name(...)``), or None."""
    match = re.match(r"\s*(?:[\w.]+\.)?" + re.escape(qualname.split(".")[-1]) + r"\((.*)\)", doc or "")
    return parse(match.group(1)) if match else None


class Imported:
    """A real module, imported."""

    def __init__(self, module):
        self.module = module

    def _find(self, qualname):
        value = self.module
        for part in qualname.split("."):
            value = getattr(value, part)
        return value

    def has(self, qualname):
        try:
            self._find(qualname)
        except AttributeError:
            return False
        return True

    def signature(self, qualname):
        value = self._find(qualname)
        if not callable(value):
            return None
        try:
            return inspect.signature(value)
        except (TypeError, ValueError):
            return _documented(qualname, value.__doc__)


class Binary:
    """A real extension module read from its binary (its CUDA library is missing here, so it does not import)."""

    def __init__(self, path):
        text = Path(path).read_bytes().decode("latin-1")
        self.lines = {}  # each name's first signature line, ``name(...)``, the parameters without parentheses
        for match in re.finditer(r"(?<![\w.])([A-Za-z_][\w.]*)\(([^()\n\0]*)\)", text):
            self.lines.setdefault(match.group(1), match.group(2))
        self.names = set(re.findall(r"(?<![\w.])[A-Za-z_]\w*(?![\w(])", text))  # the strings that are names

    def has(self, qualname):
        return qualname in self.lines or ("." not in qualname and qualname in self.names)

    def signature(self, qualname):
        line = self.lines.get(qualname)
        return None if line is None else parse(line)


class Real:
    """A stand-in module's real counterparts, in turn: a name is the first that has it."""

    def __init__(self, sources):
        self.sources = sources

    def has(self, qualname):
        return any(source.has(qualname) for source in self.sources)

    def signature(self, qualname):
        return next((source.signature(qualname) for source in self.sources if source.has(qualname)), None)


def _source(name):
    try:
        return Imported(importlib.import_module(name))
    except ImportError:
        return Binary(importlib.util.find_spec(name).origin)


def modules():
    """``{stand-in module name: Real}`` of the real CuPy (which must be importable)."""
    return {name: Real([_source(real) for real in ((reals,) if isinstance(reals, str) else reals)])
            for name, reals in MODULES.items()}


def incompatible(standin, real):
    """Why a call the stand-in's signature takes could fail against the real one's (None: it cannot):
    a parameter the real one lacks, at another position, without its default, or ``*args``/``**kwargs``."""
    strip = [[p for p in s.parameters.values()][1:] if list(s.parameters)[:1] == ["self"]
             else list(s.parameters.values()) for s in (standin, real)]
    mine, theirs = strip
    kinds = {p.kind for p in theirs}
    positional = [p for p in theirs if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = {p.name: p for p in theirs if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for index, p in enumerate(mine):
        if p.kind == p.VAR_POSITIONAL and p.VAR_POSITIONAL not in kinds:
            return f"*{p.name}: the real one takes no extra positional arguments"
        if p.kind == p.VAR_KEYWORD and p.VAR_KEYWORD not in kinds:
            return f"**{p.name}: the real one takes no extra keyword arguments"
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            if index >= len(positional):
                if p.VAR_POSITIONAL not in kinds:
                    return f"{p.name}: the real one takes {len(positional)} positional arguments"
                continue
            other = positional[index]
            if p.kind == p.POSITIONAL_OR_KEYWORD and other.name != p.name:
                return f"{p.name}: the real one has {other.name} at position {index}"
            if p.default is not p.empty and other.default is other.empty:
                return f"{p.name}: optional here, required in the real one"
        if p.kind == p.KEYWORD_ONLY:
            other = keywords.get(p.name)
            if other is None and p.VAR_KEYWORD not in kinds:
                return f"{p.name}=: the real one takes no such keyword"
            if other is not None and p.default is not p.empty and other.default is other.empty:
                return f"{p.name}: optional here, required in the real one"
    return None


def _numpy_callables(module):
    return {name for name in dir(numpy) if not name.startswith("_") and callable(getattr(numpy, name))
            and hasattr(module, name)}


def _standin_members(module):
    """``(qualified name, signature or None)`` of a stand-in module's public names and its classes' members."""
    def signature(value):
        function = getattr(value, "__func__", value)
        if isinstance(function, property) or not callable(function):
            return None
        try:
            return inspect.signature(function)
        except (TypeError, ValueError):
            return None

    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if getattr(value, "__doc__", None) == f"``numpy.{name}`` on device arrays.":
            continue  # a NumPy function served on first use, with NumPy's parameters: compared by name below
        yield name, signature(value)
        if inspect.isclass(value) and value.__module__.startswith("cupy"):
            for attr, member in vars(value).items():
                if not attr.startswith("_") or attr == "__call__":
                    yield f"{name}.{attr}", signature(member)


def compare():
    """``{"problems": [...], "numpy_not_in_cupy": [...]}``: the real CuPy read first, then the stand-in."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CuPy warns of the CUDA libraries this machine lacks (NCCL)
        import cupy

        if STANDIN in Path(cupy.__file__).resolve().parents:
            raise ImportError("the stand-in is first on the path: no real CuPy to compare with")
        reals = modules()
        has = _numpy_callables(cupy)
    for name in [name for name in sys.modules if name.split(".")[0] in ("cupy", "cupyx", "cupy_backends")]:
        del sys.modules[name]
    sys.path.insert(0, str(STANDIN))
    problems = []
    for module_name, real in reals.items():
        for name, mine in _standin_members(importlib.import_module(module_name)):
            where = f"{module_name}.{name}"
            if where in STANDIN_ONLY:
                continue
            if not real.has(name):
                problems.append(f"{where}: not in the real CuPy")
                continue
            theirs = real.signature(name) if mine is not None else None
            why = theirs is not None and incompatible(mine, theirs)
            if why:
                problems.append(f"{where}{mine} against the real {theirs}: {why}")
    served = _numpy_callables(importlib.import_module("cupy"))
    return {"problems": problems, "numpy_not_in_cupy": sorted(served - has)}


if __name__ == "__main__":
    try:
        print(json.dumps(compare()))
    except ImportError as error:  # no real CuPy here: the test skips, naming why
        print(json.dumps({"skip": f"the real CuPy does not import: {error}"}))
