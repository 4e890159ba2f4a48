"""The CUDA kernel loader and wrappers, checked without a GPU.

The wrappers run on NumPy arrays with CuPy replaced by NumPy and each kernel
launch recorded: every launch is checked against the kernel's C signature
parsed from its source (argument count, pointer dtypes, exact scalar types)
and the launch limits. Validation is checked with CuPy made unimportable, so
a ShapeError proves no CuPy call came first.
"""

import re
import subprocess
import sys
import types

import numpy
import pytest

from nnaccel import activations
from nnaccel.backend import cuda_kernels as ck
from nnaccel.errors import ConfigError, ShapeError

SIGNATURE = re.compile(r"template <typename T>\s*__global__ void (\w+)\(([^)]*)\)")
SCALARS = {"long long": numpy.int64, "int": numpy.int32, "double": numpy.float64}
POINTEES = {"long long": numpy.int64, "int": numpy.int32}


def signatures():
    """{kernel: [parameter type, ...]} parsed from the kernel sources."""
    found = {}
    for filename in ck.KERNELS:
        for name, params in SIGNATURE.findall(ck.source(filename)):
            found[name] = [" ".join(p.split()[:-1]).replace("const ", "") for p in params.split(",")]
    return found


def test_import_does_not_import_cupy():
    code = "import sys, nnaccel.backend.cuda_kernels; print('cupy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_kernel_folder_holds_every_source():
    folder = ck.kernels_dir()
    for filename in [*ck.KERNELS, "activations.cuh"]:
        assert folder.joinpath(filename).is_file(), f"{filename} missing from {folder}"


def test_sources_inline_the_header():
    for filename in ck.KERNELS:
        text = ck.source(filename)
        assert '#include "' not in text
        assert "NNA_ACTIVATIONS_CUH" in text


def test_name_expressions_match_the_templates():
    for filename, names in ck.KERNELS.items():
        templates = [name for name, _ in SIGNATURE.findall(ck.source(filename))]
        assert sorted(templates) == sorted(names), filename
        assert ck.name_expressions(filename, numpy.float32) == [f"{n}<float>" for n in names]
        assert ck.name_expressions(filename, numpy.float64) == [f"{n}<double>" for n in names]


def test_activation_codes_match_header_and_activations():
    header = ck.kernels_dir().joinpath("activations.cuh").read_text()
    enum = {name.lower(): int(code) for name, code in re.findall(r"ACT_(\w+) = (\d+)", header)}
    assert enum == ck.ACT_CODES
    for name, code in ck.ACT_CODES.items():
        act = activations.get(name)
        assert act.code == code
        assert (code in ck.GRAD_FROM_Z) == (not act.uses_output), name


def test_bias_grad_block_matches_source():
    text = ck.source("elementwise.cu")
    block = tuple(int(re.search(rf"constexpr int {n} = (\d+);", text).group(1)) for n in ("BG_COLS", "BG_ROWS"))
    assert block == ck.BIAS_GRAD_BLOCK


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 1000, 20000, 10**6])
@pytest.mark.parametrize("cols", [1, 10, 33, 3000])
def test_bias_grad_chunks_cover_all_rows(rows, cols):
    chunks, chunk_rows = ck.bias_grad_chunks(rows, cols, sm_count=132)
    assert 1 <= chunks <= 65535
    assert (chunks - 1) * chunk_rows < rows <= chunks * chunk_rows  # every row once, no empty chunk
    assert chunks == 1 or chunk_rows >= ck.BIAS_GRAD_MIN_CHUNK_ROWS


# ----- the wrappers on host arrays ---------------------------------------------------------------


class FakeDevice:
    id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class HostArray(numpy.ndarray):
    """A NumPy array that answers ``.device`` like a CuPy array."""

    device = FakeDevice()


def host(array):
    return numpy.ascontiguousarray(array).view(HostArray)


def rand(*shape, dtype=numpy.float32):
    return host(numpy.random.default_rng(0).standard_normal(shape).astype(dtype))


@pytest.fixture
def launches(monkeypatch):
    """Record launches instead of running them; CuPy's array functions become NumPy's."""
    calls = []
    kernel_signatures = signatures()

    def record(name, dtype, grid, block, args):
        params = kernel_signatures[name]
        assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)} parameters"
        for index, (param, arg) in enumerate(zip(params, args)):
            where = f"{name} argument {index} ({param})"
            if param.endswith("*"):
                pointee = param[:-1].strip()
                assert arg is None or isinstance(arg, numpy.ndarray), where
                if arg is not None:
                    assert arg.dtype == (dtype if pointee == "T" else POINTEES[pointee]), where
                    assert arg.flags.c_contiguous, where
            else:
                assert type(arg) is SCALARS[param], f"{where}: got {type(arg).__name__}"
        assert all(isinstance(g, int) and g >= 1 for g in grid) and len(grid) <= 2, grid
        assert grid[0] < 2**31 and (len(grid) == 1 or grid[1] <= 65535), grid
        assert numpy.prod(block) <= 1024, block
        calls.append(types.SimpleNamespace(name=name, dtype=dtype, grid=grid, block=block, args=args))

    fake_cupy = types.SimpleNamespace(
        empty=lambda shape, dtype: host(numpy.empty(shape, dtype)),
        asarray=lambda a, dtype, order: host(numpy.asarray(a, dtype, order=order)))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(ck, "_sm_count", lambda device_id: 132)
    monkeypatch.setattr(ck, "_kernel", lambda name, dtype: lambda grid, block, args: record(name, dtype, grid, block, args))
    return calls


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_bias_act_launch(launches, dtype):
    z, bias = rand(5, 7, dtype=dtype), rand(7, dtype=dtype)
    assert ck.bias_act(z, bias, ck.ACT_CODES["elu"], 0.5, z) is z
    assert ck.bias_act(z, None, ck.ACT_CODES["gelu"], 0.0, rand(5, 7, dtype=dtype)) is not z
    first, second = launches
    assert first.name == "bias_act" and first.dtype == dtype and first.args[1] is bias
    assert first.args[3:] == (5, 7, 3, 0.5)
    assert second.args[1] is None and second.args[5] == 7


def test_large_launch_is_capped(launches):
    z = host(numpy.empty((4096, 4096), numpy.float32))
    ck.bias_act(z, None, 0, 0.0, z)
    assert launches[0].grid == (ck.BLOCKS_PER_SM * 132,)


def test_act_backward_reads_what_the_activation_needs(launches):
    dy, y, z = rand(4, 3), rand(4, 3), rand(4, 3)
    ck.act_backward(dy, y, None, ck.ACT_CODES["relu"], 0.0, dy)
    ck.act_backward(dy, None, z, ck.ACT_CODES["silu"], 0.0, dy)
    ck.act_backward(dy, None, None, ck.ACT_CODES["linear"], 0.0, dy)
    assert [c.args[1] for c in launches] == [y, z, None]
    assert all(c.name == "act_backward" and c.args[3] == 12 for c in launches)


def test_bias_grad_in_one_launch_for_few_rows(launches):
    dy, y, db = rand(40, 3000), rand(40, 3000), rand(3000)
    ck.act_backward(dy, y, None, 1, 0.0, dy, db)
    (call,) = launches
    assert call.name == "act_backward_bias_grad" and call.args[3] is db
    assert call.grid == (94, 1) and call.block == ck.BIAS_GRAD_BLOCK


def test_bias_grad_in_chunks_for_many_rows(launches):
    dy, db = rand(20000, 3000), rand(3000)
    ck.act_backward(dy, None, None, 0, 0.0, rand(20000, 3000), db)
    grad, reduce = launches
    chunks, chunk_rows = ck.bias_grad_chunks(20000, 3000, 132)
    assert chunks > 1 and grad.grid == (94, chunks) and grad.args[4:7] == (20000, 3000, chunk_rows)
    assert grad.args[3].shape == (chunks, 3000) and reduce.args[0] is grad.args[3]
    assert reduce.name == "bias_grad_reduce" and reduce.args[1] is db and reduce.args[2:] == (chunks, 3000)


def test_bias_grad_of_no_rows_is_zero(launches):
    db = rand(3)
    ck.act_backward(rand(0, 3), rand(0, 3), None, 1, 0.0, rand(0, 3), db)
    assert not launches and not db.any()


def test_softmax_launches(launches):
    z = rand(100, 10, dtype=numpy.float64)
    ck.softmax(z, z)
    ck.softmax_backward(z, rand(100, 10, dtype=numpy.float64), z)
    assert [c.name for c in launches] == ["softmax_rows", "softmax_backward"]
    assert all(c.grid == (13,) and c.args[-2:] == (100, 10) for c in launches)  # 8 rows per block


def test_cross_entropy_launch(launches):
    logits = rand(6, 4)
    loss = ck.softmax_cross_entropy(logits, host(numpy.arange(6, dtype=numpy.int32) % 4), logits)
    (call,) = launches
    assert call.args[1].dtype == numpy.int64 and list(call.args[1]) == [0, 1, 2, 3, 0, 1]
    assert call.args[3].shape == (6,) and call.args[4:] == (6, 4, 1.0 / 6)
    assert numpy.ndim(loss) == 0


def test_optimizer_launches(launches):
    p = rand(100)
    ck.sgd_update(p, rand(100), rand(100), 0.1, 0.9, 1e-4, True)
    ck.adam_update(p, rand(100), rand(100), rand(100), 1e-3, 0.9, 0.999, 1e-8, 0.01, True, 3)
    sgd, adam = launches
    assert sgd.args[3:] == (100, 0.1, 0.9, 1e-4, 1)
    assert adam.args[4:] == (100, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1, 1 - 0.9**3, 1 - 0.999**3)


def test_maxout_launches(launches):
    z3, y, idx = rand(5, 3, 4), rand(5, 3), host(numpy.zeros((5, 3), numpy.int32))
    ck.maxout_forward(z3, y, idx)
    ck.maxout_backward(y, idx, z3)
    forward, backward = launches
    assert forward.args[3:] == (15, 4) and forward.grid == (1,)
    assert backward.args[3:] == (15, 4) and backward.args[2] is z3


# ----- validation before any CuPy call ---------------------------------------------------------------


@pytest.fixture
def no_cupy(monkeypatch):
    """Make ``import cupy`` fail, so only validation can run."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(ck, "_sm_count", lambda device_id: pytest.fail("touched the GPU"))


f32, f64 = (lambda *s: numpy.zeros(s, numpy.float32)), (lambda *s: numpy.zeros(s, numpy.float64))
REJECTED = [
    ("float64 bias", lambda: ck.bias_act(f32(4, 3), f64(3), 1, 0.0, f32(4, 3)), ShapeError, "bias"),
    ("float64 out", lambda: ck.bias_act(f32(4, 3), f32(3), 1, 0.0, f64(4, 3)), ShapeError, "out"),
    ("float16 z", lambda: ck.bias_act(numpy.zeros((4, 3), numpy.float16), None, 1, 0.0, f32(4, 3)),
     ShapeError, "z"),
    ("strided z", lambda: ck.bias_act(f32(4, 6)[:, ::2], f32(3), 1, 0.0, f32(4, 3)), ShapeError, "z"),
    ("bias length", lambda: ck.bias_act(f32(4, 3), f32(4), 1, 0.0, f32(4, 3)), ShapeError, "bias"),
    ("softmax code", lambda: ck.bias_act(f32(4, 3), None, 9, 0.0, f32(4, 3)), ConfigError, "code"),
    ("missing y", lambda: ck.act_backward(f32(4, 3), None, f32(4, 3), 1, 0.0, f32(4, 3)), ShapeError, "y"),
    ("missing z", lambda: ck.act_backward(f32(4, 3), f32(4, 3), None, 7, 0.0, f32(4, 3)), ShapeError, "z"),
    ("float64 y", lambda: ck.act_backward(f32(4, 3), f64(4, 3), None, 1, 0.0, f32(4, 3)), ShapeError, "y"),
    ("transposed dz", lambda: ck.act_backward(f32(3, 3), f32(3, 3), None, 1, 0.0, f32(3, 3).T), ShapeError,
     "dz"),
    ("db length", lambda: ck.act_backward(f32(4, 3), f32(4, 3), None, 1, 0.0, f32(4, 3), f32(4)), ShapeError,
     "db"),
    ("softmax out", lambda: ck.softmax(f32(4, 3), f32(3, 4)), ShapeError, "out"),
    ("softmax y", lambda: ck.softmax_backward(f32(4, 3), f64(4, 3), f32(4, 3)), ShapeError, "y"),
    ("float labels", lambda: ck.softmax_cross_entropy(f32(4, 3), f32(4), f32(4, 3)), ShapeError, "labels"),
    ("labels length", lambda: ck.softmax_cross_entropy(f32(4, 3), numpy.zeros(5, int), f32(4, 3)),
     ShapeError, "labels"),
    ("1-d logits", lambda: ck.softmax_cross_entropy(f32(4), numpy.zeros(4, int), f32(4)), ShapeError, "logits"),
    ("float64 grad", lambda: ck.softmax_cross_entropy(f32(4, 3), numpy.zeros(4, int), f64(4, 3)), ShapeError,
     "grad"),
    ("sgd velocity", lambda: ck.sgd_update(f32(10), f32(10), f64(10), 0.1, 0.9, 0.0, False), ShapeError,
     "velocity"),
    ("adam m", lambda: ck.adam_update(f32(10), f32(10), f32(9), f32(10), 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 1),
     ShapeError, "m"),
    ("adam step 0", lambda: ck.adam_update(f32(10), f32(10), f32(10), f32(10), 1e-3, 0.9, 0.999, 1e-8, 0.0,
                                           False, 0), ConfigError, "step"),
    ("int64 index", lambda: ck.maxout_forward(f32(2, 3, 4), f32(2, 3), numpy.zeros((2, 3), numpy.int64)),
     ShapeError, "index"),
    ("2-d z3", lambda: ck.maxout_forward(f32(2, 12), f32(2, 3), numpy.zeros((2, 3), numpy.int32)), ShapeError,
     "z3"),
    ("maxout dy", lambda: ck.maxout_backward(f64(2, 3), numpy.zeros((2, 3), numpy.int32), f32(2, 3, 4)),
     ShapeError, "dy"),
]


@pytest.mark.parametrize("call, error, word", [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED])
def test_wrappers_reject_bad_arrays_before_cupy(no_cupy, call, error, word):
    with pytest.raises(error) as info:
        call()
    assert re.search(rf"(^|\s){word}\b", str(info.value)), f"the message does not name {word}: {info.value}"
