"""The CUDA kernel loader and wrappers, without any CUDA: the sources, the launch geometry, and the
argument checks that run before CuPy is touched (with CuPy made unimportable, a ShapeError or a
DeviceError proves no CuPy call came first). The kernels themselves run in tests/test_cuda_kernels.py.
"""

import re
import subprocess
import sys

import numpy
import pytest

from nnaccel import activations
from nnaccel.backend import cuda_kernels as ck
from nnaccel.backend.base import Window
from nnaccel.errors import ConfigError, DeviceError, ShapeError

SIGNATURE = re.compile(r"template <typename [TS]>\s*__global__ void (\w+)\(([^)]*)\)")
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
    for filename in [*ck.KERNELS, "activations.cuh", "bfloat16.cuh"]:
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
        floats = [n for n in names if n not in ("to_storage", "from_storage")]  # conversions: bf16 only
        assert ck.name_expressions(filename, numpy.float32) == [f"{n}<float>" for n in floats]
        assert ck.name_expressions(filename, numpy.float64) == [f"{n}<double>" for n in floats]
        compute_only = ("bias_grad_reduce", "softmax_rows", "softmax_backward", "batchnorm_stats_merge")
        bf16 = [n for n in names if n not in compute_only and
                filename in ("elementwise.cu", "conv.cu", "batchnorm.cu")]  # the layers with bfloat16 storage
        assert ck.name_expressions(filename, numpy.uint16) == [f"{n}<nna::bf16>" for n in bf16]


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


@pytest.mark.parametrize("n, c, l", [(1, 1, 2), (128, 6, 784), (128, 16, 100), (128, 120, 1), (5000, 3, 1),
                                     (7, 2, 10**6), (64, 512, 49)])
@pytest.mark.parametrize("sm_count", [2, 132])
def test_channel_chunks_cover_all_images_and_fill_the_gpu(n, c, l, sm_count):
    chunks, chunk_images = ck.channel_chunks(n, c, l, sm_count)
    assert 1 <= chunks <= min(n, 65535)
    assert (chunks - 1) * chunk_images < n <= chunks * chunk_images  # every image once, no empty chunk
    assert chunks == 1 or chunk_images * l >= ck.CHANNEL_MIN_CHUNK_VALUES


def test_a_few_channels_of_large_images_fill_the_gpu():
    """The default recipe's first BatchNorm (6 channels of 28x28 at batch 128) on an H100's 132
    multiprocessors: one block per channel would leave 126 of them idle."""
    chunks, _ = ck.channel_chunks(128, 6, 784, sm_count=132)
    assert 6 * chunks >= 132
    assert ck.channel_chunks(0, 6, 784, sm_count=132) == (1, 1)  # no images: one (empty) chunk, no division by 0


# ----- validation before any CuPy call ---------------------------------------------------------------


@pytest.fixture
def no_cupy(monkeypatch):
    """Make ``import cupy`` fail, so only validation can run."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(ck, "_sm_count", lambda device_id: pytest.fail("touched the GPU"))


f32, f64 = (lambda *s: numpy.zeros(s, numpy.float32)), (lambda *s: numpy.zeros(s, numpy.float64))
i32, u16 = (lambda *s: numpy.zeros(s, numpy.int32)), (lambda *s: numpy.zeros(s, numpy.uint16))
W2, RELU = Window(2, 2, 2, 2, 0, 0), ck.ACT_CODES["relu"]  # (1, 1, 4, 4) images pool to (1, 1, 2, 2)
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
    ("sgd momentum, no velocity", lambda: ck.sgd_update(f32(10), f32(10), None, 0.1, 0.9, 0.0, False), ShapeError,
     "velocity"),
    ("nchw bias None", lambda: ck.bias_act_to_nchw(f32(1, 6), None, RELU, 0.0, f32(1, 6), f32(2, 1, 3)),
     ShapeError, "bias"),
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
    # Host arrays of the right dtypes and shapes: each wrapper names the first one, before any launch.
    ("host z", lambda: ck.bias_act(f32(4, 3), f32(3), 1, 0.0, f32(4, 3)), DeviceError, "z"),
    ("host dy", lambda: ck.act_backward(f32(4, 3), f32(4, 3), None, 1, 0.0, f32(4, 3), f32(3)), DeviceError, "dy"),
    ("host convert x", lambda: ck.convert(f32(4), u16(4)), DeviceError, "x"),
    ("host gemm a", lambda: ck.gemm_bf16(u16(2, 3), u16(3, 2), f32(2, 2)), DeviceError, "a"),
    ("host softmax z", lambda: ck.softmax(f32(4, 3), f32(4, 3)), DeviceError, "z"),
    ("host softmax dy", lambda: ck.softmax_backward(f32(4, 3), f32(4, 3), f32(4, 3)), DeviceError, "dy"),
    ("host logits", lambda: ck.softmax_cross_entropy(f32(4, 3), numpy.zeros(4, int), f32(4, 3)), DeviceError,
     "logits"),
    ("host sgd param", lambda: ck.sgd_update(f32(10), f32(10), f32(10), 0.1, 0.9, 0.0, False), DeviceError,
     "param"),
    ("host adam param", lambda: ck.adam_update(f32(10), f32(10), f32(10), f32(10), 1e-3, 0.9, 0.999, 1e-8, 0.0,
                                               False, 1), DeviceError, "param"),
    ("host z3", lambda: ck.maxout_forward(f32(2, 3, 4), f32(2, 3), i32(2, 3)), DeviceError, "z3"),
    ("host dz3", lambda: ck.maxout_backward(f32(2, 3), i32(2, 3), f32(2, 3, 4)), DeviceError, "dz3"),
    ("host im2col x", lambda: ck.im2col(f32(1, 1, 4, 4), W2, f32(4, 4)), DeviceError, "x"),
    ("host columns", lambda: ck.col2im(f32(4, 4), W2, f32(1, 1, 4, 4)), DeviceError, "columns"),
    ("host nchw z", lambda: ck.bias_act_to_nchw(f32(1, 6), f32(1), RELU, 0.0, f32(1, 6), f32(2, 1, 3)),
     DeviceError, "z"),
    ("host nchw dy", lambda: ck.act_backward_from_nchw(f32(2, 1, 3), f32(1, 6), None, RELU, 0.0, f32(1, 6)),
     DeviceError, "dy"),
    ("host maxpool x", lambda: ck.maxpool_forward(f32(1, 1, 4, 4), W2, f32(1, 1, 2, 2), i32(1, 1, 2, 2)),
     DeviceError, "x"),
    ("host maxpool dy", lambda: ck.maxpool_backward(f32(1, 1, 2, 2), i32(1, 1, 2, 2), W2, f32(1, 1, 4, 4)),
     DeviceError, "dy"),
    ("host avgpool x", lambda: ck.avgpool_forward(f32(1, 1, 4, 4), W2, f32(1, 1, 2, 2)), DeviceError, "x"),
    ("host avgpool dy", lambda: ck.avgpool_backward(f32(1, 1, 2, 2), W2, f32(1, 1, 4, 4)), DeviceError, "dy"),
    ("host bn stats x", lambda: ck.batchnorm_stats(f32(2, 3, 4), f32(3), f32(3), 1e-5, f32(3), f32(3), 0.1),
     DeviceError, "x"),
    ("host bn apply x", lambda: ck.batchnorm_apply(f32(2, 3, 4), f32(3), f32(3), f32(3), f32(3), f32(2, 3, 4)),
     DeviceError, "x"),
    ("host bn backward dy", lambda: ck.batchnorm_backward(f32(2, 3, 4), f32(2, 3, 4), f32(3), f32(3), f32(3),
                                                          f32(2, 3, 4), f32(3), f32(3)), DeviceError, "dy"),
]


@pytest.mark.parametrize("call, error, word", [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED])
def test_wrappers_reject_bad_arrays_before_cupy(no_cupy, call, error, word):
    with pytest.raises(error) as info:
        call()
    assert re.search(rf"(^|\s){word}\b", str(info.value)), f"the message does not name {word}: {info.value}"
    if error is DeviceError:
        assert "host (cpu)" in str(info.value), f"the message does not say where {word} is: {info.value}"

