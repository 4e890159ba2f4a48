"""Devices, backends and the ops every backend shares (run on each available device)."""

import inspect
import platform
import subprocess
import sys

import numpy
import pytest

import nnaccel as nn
from nnaccel.backend import Backend, cuda_status, get_backend, resolve_device
from nnaccel.backend.base import Window
from nnaccel.backend.cupy_backend import CupyBackend
from nnaccel.backend.numpy_backend import NumpyBackend

GPU_COUNT = cuda_status()[0]


def test_device_names():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(" CPU ") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if GPU_COUNT else "cpu")
    for bad in ("tpu", "cuda:x", "cuda:-1", ""):
        with pytest.raises(nn.DeviceError, match="unknown device"):
            resolve_device(bad)
    with pytest.raises(nn.DeviceError, match="must be a string"):
        resolve_device(0)


@pytest.mark.skipif(GPU_COUNT > 0, reason="a GPU answers here")
def test_a_model_on_auto_without_a_gpu_says_it_is_on_the_cpu_and_why():
    with pytest.warns(UserWarning, match=r"device 'auto' puts the model on the CPU: (CuPy|.*CUDA)") as said:
        model = nn.Sequential(nn.Dense(3, 2), device="auto")
    assert model.backend.name == "cpu" and cuda_status()[1] in str(said[0].message)
    with pytest.warns(UserWarning, match="device 'auto' puts the model on the CPU"):
        model.to("auto")


@pytest.mark.skipif(GPU_COUNT > 0, reason="a GPU answers here")
def test_cuda_without_gpu_says_why():
    with pytest.raises(nn.DeviceError, match="not usable: .*(CuPy|driver|device)"):
        nn.Sequential(nn.Dense(4, 2), device="cuda")
    with pytest.raises(nn.DeviceError, match="not usable"):
        resolve_device("cuda:1")


def test_cuda_status_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    count, reason = cuda_status.__wrapped__()
    assert count == 0 and "CuPy is not installed" in reason and "nnaccel[cuda12]" in reason


def test_cupy_installed_without_gpu_fails_at_first_allocation():
    """CuPy imports on a machine with no driver; only an allocation fails. nnaccel reports it."""
    cupy = pytest.importorskip("cupy")
    if GPU_COUNT:
        pytest.skip("a GPU answers here")
    count, reason = cuda_status()
    assert count == 0 and cupy.__version__ in reason
    with pytest.raises(Exception):
        cupy.zeros(1)


def test_importing_nnaccel_does_not_import_cupy():
    code = "import sys, nnaccel, nnaccel.backend.cupy_backend; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("cls", [NumpyBackend, CupyBackend])
def test_backends_keep_the_base_signatures(cls):
    """Thinc's consistency check: an override keeps the base op's parameters."""
    for name, member in vars(cls).items():
        base = getattr(Backend, name, None)
        if callable(member) and callable(base) and not name.startswith("_"):
            assert inspect.signature(member) == inspect.signature(base), name


UPDATES = [("sgd", (0.1, 0.0, 0.0, False)), ("sgd", (0.1, 0.9, 1e-3, True)), ("sgd", (0.1, 0.9, 0.0, False)),
           ("adam", (1e-2, 0.9, 0.999, 1e-8, 0.0, False, 3)), ("adam", (1e-2, 0.9, 0.999, 1e-8, 0.01, True, 3)),
           ("adam", (1e-2, 0.9, 0.999, 1e-8, 0.01, False, 1))]


class _NumpyPasses(NumpyBackend):
    """The CPU backend with NumPy's passes where it would call BLAS's axpy and axpby."""

    _blend, _descend = Backend._blend, Backend._descend


def _update_buffers(name, options, dtype, size, seed=5):
    """(param, grad, *state) of an optimizer step over ``size`` values."""
    rng = numpy.random.default_rng(seed)
    param, grad, *state = (rng.standard_normal(size).astype(dtype) for _ in range(2 + (2 if name == "adam" else 1)))
    if name == "adam":
        state[1] = numpy.abs(state[1])  # the second moment
    elif not options[1]:
        state = [None]  # SGD without momentum: no velocity buffer
    return param, grad, state


def _step_copies(ops, name, options, param, grad, state, update=None):
    """Copies of the buffers after ``ops``'s step (``update``: that unbound method instead, on ``ops``)."""
    buffers = [param.copy(), *(s if s is None else s.copy() for s in state)]
    (update or getattr(type(ops), f"{name}_update"))(ops, buffers[0], grad, *buffers[1:], *options)
    return buffers


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("name, options", UPDATES, ids=[f"{n}{o}" for n, o in UPDATES])
def test_the_cpu_updates_in_cache_sized_blocks_the_same_numbers(dtype, name, options):
    """Over a buffer of several blocks and a short last one, the blocked optimizer step gives the base
    backend's one-pass numbers bit for bit, and leaves the state where the base leaves it."""
    from nnaccel.backend.numpy_backend import UPDATE_BLOCK_BYTES

    size = 2 * UPDATE_BLOCK_BYTES // numpy.dtype(dtype).itemsize + 1001
    param, grad, state = _update_buffers(name, options, dtype, size)
    ops = _NumpyPasses()
    blocked = _step_copies(ops, name, options, param, grad, state)
    whole = _step_copies(ops, name, options, param, grad, state, getattr(Backend, f"{name}_update"))
    for a, b in zip(blocked, whole):
        if b is not None:
            numpy.testing.assert_array_equal(a, b)


def test_the_cpu_finds_numpys_own_blas():
    """Where NumPy's wheel bundles scipy-openblas, the optimizer's passes reach that library, the one
    NumPy's matmul uses (threadpoolctl then still sees a single OpenBLAS, so no second thread pool). The
    count is taken in a fresh process: a test before this one in the same worker may have imported SciPy
    (scikit-learn's digits), whose own OpenBLAS nnaccel never loads."""
    from nnaccel.backend.blas import numpy_blas

    if numpy.__config__.CONFIG["Build Dependencies"]["blas"]["name"] != "scipy-openblas":
        pytest.skip("this NumPy has another BLAS: its optimizer steps keep NumPy's passes")
    pytest.importorskip("threadpoolctl")
    blas = numpy_blas()
    assert blas is not None
    count = ("import threadpoolctl; from nnaccel.backend.blas import numpy_blas; assert numpy_blas() is not None; "
             "print(len([pool for pool in threadpoolctl.threadpool_info() if pool['internal_api'] == 'openblas']))")
    assert subprocess.run([sys.executable, "-c", count], capture_output=True, text=True, check=True).stdout == "1\n"
    x, y = numpy.arange(5, dtype=numpy.float32), numpy.ones(5, numpy.float32)
    numpy.testing.assert_array_equal(blas.axpby(2.0, x, 0.5, y), [0.5, 2.5, 4.5, 6.5, 8.5])
    numpy.testing.assert_array_equal(blas.axpy(-1.0, x, y), [0.5, 1.5, 2.5, 3.5, 4.5])
    assert not blas.takes(x, numpy.ones(5)) and not blas.takes(x, numpy.ones(10, numpy.float32)[::2])


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("name, options", UPDATES, ids=[f"{n}{o}" for n, o in UPDATES])
def test_the_cpu_updates_through_blas_as_through_numpy(dtype, name, options):
    """The step whose passes go to BLAS (a fused multiply-add each) gives NumPy's passes' numbers to a
    few roundings, over blocks that take BLAS and a last block too short for it."""
    from nnaccel.backend.numpy_backend import BLAS_UPDATE_FROM, UPDATE_BLOCK_BYTES

    assert BLAS_UPDATE_FROM <= UPDATE_BLOCK_BYTES  # the full blocks take BLAS, the short last one not
    size = 2 * UPDATE_BLOCK_BYTES // numpy.dtype(dtype).itemsize + 1001
    param, grad, state = _update_buffers(name, options, dtype, size)
    ours = _step_copies(get_backend("cpu"), name, options, param, grad, state)
    theirs = _step_copies(_NumpyPasses(), name, options, param, grad, state)
    tolerance = 8 * numpy.finfo(dtype).eps
    for a, b in zip(ours, theirs):
        if b is not None:
            numpy.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)


class _FakeCupyArray:
    """Looks like a CuPy array to the device checks, without needing a GPU."""

    __module__ = "cupy._core.core"
    shape, ndim, dtype = (2, 4), 2, numpy.dtype(numpy.float32)

    class device:
        id = 0


def test_mixing_devices_names_both():
    model = nn.Sequential(nn.Dense(4, 2), device="cpu")
    with pytest.raises(nn.DeviceError, match="x is on cuda:0 but the model is on cpu"):
        model.forward(_FakeCupyArray())
    with pytest.raises(nn.DeviceError, match="on cuda:0 but the model is on cpu"):
        nn.Trainer(model).fit(_FakeCupyArray(), numpy.zeros(2, int))


def test_matmul_transposes_and_writes_out(device):
    ops = get_backend(device)
    rng = numpy.random.default_rng(0)
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((5, 4))
    out = ops.empty((3, 4), numpy.float64)
    result = ops.matmul(ops.asarray(a), ops.asarray(b), out=out, trans_a=True)
    assert result is out
    numpy.testing.assert_allclose(ops.to_host(out), a.T @ b, rtol=1e-12)
    out2 = ops.empty((5, 5), numpy.float64)
    ops.matmul(ops.asarray(a), ops.asarray(a), out=out2, trans_b=True)
    numpy.testing.assert_allclose(ops.to_host(out2), a @ a.T, rtol=1e-12)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("positions", [800, 20_001])
def test_a_long_reduction_with_fewer_rows_than_columns(device, dtype, positions):
    """A convolution's weight gradient ``dz @ cols.T`` (6 filters, 25 taps, a long sum): written into
    its place in the flat gradients, the values beside it untouched (the CPU turns the product, and
    sums 20,001 positions in chunks of 4,096, the last one short)."""
    ops = get_backend(device)
    rng = numpy.random.default_rng(1)
    dz, cols = rng.standard_normal((6, positions)), rng.standard_normal((25, positions))
    flat = ops.asarray(numpy.full(6 * 25 + 2, 7.0), dtype=dtype)
    out = flat[1:-1].reshape(6, 25)
    result = ops.matmul(ops.asarray(dz, dtype=dtype), ops.asarray(cols, dtype=dtype), out=out, trans_b=True)
    assert result is out
    bound = positions * numpy.finfo(dtype).eps * (abs(dz) @ abs(cols).T)  # a dot product's rounding bound
    assert (abs(ops.to_host(out) - dz @ cols.T) <= bound).all()
    assert ops.to_host(flat)[[0, -1]].tolist() == [7.0, 7.0]
    if device == "cpu":
        assert ("matmul_transposed", (25, 6), numpy.dtype(dtype)) in ops._scratch_arrays
        assert (("matmul_chunk", (25, 6), numpy.dtype(dtype)) in ops._scratch_arrays) == (positions > 800)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("positions", [800, 20_001, 90_000])
def test_a_wide_product_of_a_small_matrix(device, dtype, positions, monkeypatch):
    """A convolution's forward ``w @ cols`` (6 filters of 25 taps over many positions), written into its
    place in a larger array, the values beside it untouched: within a dot product's rounding bound (the
    CPU takes 20,001 columns in chunks of 4,096, the last one short, and 800, or 90,000 (more than
    ``WIDE_PRODUCT_BYTES`` of them), in one product)."""
    ops = get_backend(device)
    rng = numpy.random.default_rng(3)
    w, cols = rng.standard_normal((6, 25)), rng.standard_normal((25, positions))
    flat = ops.asarray(numpy.full(6 * positions + 2, 7.0), dtype=dtype)
    out = flat[1:-1].reshape(6, positions)
    products = []
    if device == "cpu":
        matmul = numpy.matmul
        monkeypatch.setattr(numpy, "matmul", lambda a, b, **kw: products.append(b.shape) or matmul(a, b, **kw))
    result = ops.matmul(ops.asarray(w, dtype=dtype), ops.asarray(cols, dtype=dtype), out=out)
    assert result is out
    bound = 25 * numpy.finfo(dtype).eps * (abs(w) @ abs(cols))
    assert (abs(ops.to_host(out) - w @ cols) <= bound).all()
    assert ops.to_host(flat)[[0, -1]].tolist() == [7.0, 7.0]
    if device == "cpu":
        assert products == ([(25, 4096)] * 4 + [(25, 20_001 - 4 * 4096)] if positions == 20_001 else [(25, positions)])


def test_a_long_reduction_of_many_outputs_runs_whole():
    """A product with too many outputs for chunks of 2,048 (LeNet-5's second weight gradient, 16 filters
    of 150 taps) is one matmul."""
    ops = get_backend("cpu")
    rng = numpy.random.default_rng(2)
    dz, cols = rng.standard_normal((16, 20_000)), rng.standard_normal((150, 20_000))
    out = ops.empty((16, 150), numpy.float64)
    ops.matmul(dz, cols, out=out, trans_b=True)
    numpy.testing.assert_allclose(out, dz @ cols.T, rtol=1e-10, atol=1e-10)
    assert not any(key[0] == "matmul_chunk" for key in ops._scratch_arrays)


def test_image_arrays_are_batch_last_on_the_cpu(device):
    """``image_array`` gives (..., N, C, H, W) arrays: on the CPU each pixel's images lie together, in the
    order of a convolution's columns (``by_image``); elsewhere contiguous."""
    ops = get_backend(device)
    for shape in ((2, 2, 5, 3, 4, 2), (5, 3, 4, 2)):
        images = ops.image_array(shape, numpy.float32)
        assert images.shape == shape and images.dtype == numpy.float32
        if device != "cpu":
            assert images.flags.c_contiguous
            continue
        memory = images.transpose(*range(len(shape) - 4), *range(len(shape) - 3, len(shape)), len(shape) - 4)
        assert memory.flags.c_contiguous
    if device == "cpu":  # the columns' order is the images' memory order
        columns = ops.empty((3, 5 * 4 * 2), numpy.float32)
        images[...] = numpy.arange(images.size, dtype=numpy.float32).reshape(images.shape)
        ops.by_image(columns, (3,), 5, (4, 2))[...] = images.transpose(1, 0, 2, 3)
        memory = images.transpose(1, 2, 3, 0)  # C-contiguous, as asserted above
        numpy.testing.assert_array_equal(columns.ravel(), memory.ravel())


@pytest.mark.parametrize("name", ["relu", "gelu"])
def test_a_convolutions_rows_are_its_images_where_they_lie_alike(device, name):
    """``image_rows`` views a batch-last image array as a convolution's (C, N*L) rows (the CPU's), else gives
    None; ``bias_act_to_nchw`` into those rows and ``act_backward_from_nchw`` reading them give exactly
    what the copies between the two layouts give."""
    ops, activation = get_backend(device), nn.activations.get(name)
    rng = numpy.random.default_rng(4)
    n, c, spatial = 5, 3, (4, 2)
    images = ops.image_array((n, c, *spatial), numpy.float32)
    rows = ops.image_rows(images)
    assert ops.image_rows(ops.empty((n, c, *spatial), numpy.float32)) is None or not ops.batch_last
    if device != "cpu":
        assert rows is None
        return
    assert rows.shape == (c, n * 8) and numpy.shares_memory(rows, images)
    z = rng.standard_normal((c, n * 8)).astype(numpy.float32)
    bias = rng.standard_normal(c).astype(numpy.float32)
    expected = ops.bias_act_to_nchw(z.copy(), bias, activation, numpy.empty_like(z),
                                    ops.empty(images.shape, numpy.float32))
    z_kept = z.copy()
    y = ops.bias_act_to_nchw(z_kept, bias, activation, rows, images)
    assert y is images
    numpy.testing.assert_array_equal(y, expected)
    dy = ops.image_array(images.shape, numpy.float32)
    dy[...] = rng.standard_normal(images.shape)
    through_rows = ops.act_backward_from_nchw(dy, rows, z_kept, activation, numpy.empty_like(z))
    copied = ops.act_backward_from_nchw(numpy.ascontiguousarray(dy), rows, z_kept, activation, numpy.empty_like(z))
    numpy.testing.assert_array_equal(through_rows, copied)
    assert numpy.abs(through_rows).sum() > 0


def test_relu_in_every_layout(device):
    """``relu`` is ``max(z, 0)`` with NaN kept, into ``out`` or in place, over C-ordered arrays, their
    transposes (a convolution's rows), strided views and batch-last images, large (the CPU's array of
    zeros, which stays zero) and small."""
    ops = get_backend(device)
    z = numpy.random.default_rng(3).standard_normal((70, 400)).astype(numpy.float32)
    z[0, :3] = [numpy.nan, -numpy.inf, numpy.inf]
    for view in (lambda a: a, lambda a: a.T, lambda a: a[::2, 1::3], lambda a: a[2, 5:6],
                 lambda a: a.reshape(4, 5, 7, 200).transpose(3, 0, 1, 2)):
        out = ops.empty(view(z).shape, numpy.float32)
        assert ops.relu(view(ops.asarray(z)), out) is out
        numpy.testing.assert_array_equal(ops.to_host(out), numpy.maximum(view(z), 0))
        inplace = ops.asarray(z)
        ops.relu(view(inplace), view(inplace))
        numpy.testing.assert_array_equal(ops.to_host(view(inplace)), numpy.maximum(view(z), 0))
    if device == "cpu":
        zeros = [array for key, array in ops._scratch_arrays.items() if key[0] == "relu_zeros"]
        assert zeros and not any(array.any() for array in zeros)


def test_softmax_is_stable(device):
    ops = get_backend(device)
    z = numpy.array([[1e4, 0.0, -1e4], [1.0, 2.0, 3.0]], numpy.float32)
    out = ops.softmax(ops.asarray(z), ops.empty(z.shape))
    expected = numpy.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    numpy.testing.assert_allclose(ops.to_host(out), expected, rtol=1e-6)


def test_softmax_cross_entropy_matches_naive(device):
    ops = get_backend(device)
    rng = numpy.random.default_rng(1)
    z = rng.standard_normal((7, 5)) * 10
    labels = rng.integers(0, 5, 7)
    grad = ops.empty(z.shape, numpy.float64)
    loss = ops.softmax_cross_entropy(ops.asarray(z), ops.asarray(labels), grad)
    p = numpy.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    numpy.testing.assert_allclose(float(loss), -numpy.log(p[numpy.arange(7), labels]).mean(), rtol=1e-12)
    p[numpy.arange(7), labels] -= 1
    numpy.testing.assert_allclose(ops.to_host(grad), p / 7, rtol=1e-12, atol=1e-15)


def test_a_strided_index_of_maxout_and_max_pooling(device):
    """The index arrays of Maxout and max pooling may be strided as their other arrays may (the CUDA
    backend takes the generic ops then): the same maxima, indices and gradients."""
    ops = get_backend(device)
    rng = numpy.random.default_rng(3)
    z3 = ops.asarray(rng.standard_normal((4, 3, 2)).astype(numpy.float32))
    dy = ops.asarray(numpy.ones((4, 3), numpy.float32))
    x, window = ops.asarray(rng.standard_normal((2, 3, 4, 4)).astype(numpy.float32)), Window(2, 2, 2, 2, 0, 0)
    results = {}
    for strided in (False, True):
        index = ops.asarray(numpy.zeros((3, 4), numpy.int32)).T if strided else ops.empty((4, 3), numpy.int32)
        y = ops.to_host(ops.maxout_forward(z3, ops.empty((4, 3)), index))
        dz3 = ops.to_host(ops.maxout_backward(dy, index, ops.empty((4, 3, 2))))
        pool_index = ops.asarray(numpy.zeros((2, 2, 3, 2), numpy.int32)).transpose(0, 2, 1, 3) if strided \
            else ops.empty((2, 3, 2, 2), numpy.int32)
        pooled = ops.to_host(ops.maxpool_forward(x, window, ops.empty((2, 3, 2, 2)), pool_index))
        dx = ops.to_host(ops.maxpool_backward(ops.asarray(numpy.ones((2, 3, 2, 2), numpy.float32)), pool_index, window,
                                              ops.empty((2, 3, 4, 4))))
        results[strided] = [y, ops.to_host(index), dz3, pooled, ops.to_host(pool_index), dx]
    for got, expected in zip(results[True], results[False], strict=True):
        numpy.testing.assert_array_equal(got, expected)


def test_softmax_cross_entropy_into_a_strided_grad(device):
    """A transposed gradient buffer (the generic op, which the CUDA backend falls back to for it) gets
    the same loss and gradient as a contiguous one, also when it holds the logits."""
    ops = get_backend(device)
    z = numpy.random.default_rng(2).standard_normal((4, 6)).astype(numpy.float32)
    labels = ops.asarray(numpy.array([0, 5, 2, 3]))
    grad = ops.empty(z.shape, numpy.float32)
    loss = float(ops.softmax_cross_entropy(ops.asarray(z), labels, grad))
    strided = ops.asarray(numpy.full((6, 4), 7.0, numpy.float32)).T
    assert float(ops.softmax_cross_entropy(ops.asarray(z), labels, strided)) == pytest.approx(loss, rel=1e-6)
    numpy.testing.assert_allclose(ops.to_host(strided), ops.to_host(grad), rtol=1e-6, atol=1e-8)
    aliased = ops.asarray(numpy.ascontiguousarray(z.T)).T
    assert float(ops.softmax_cross_entropy(aliased, labels, aliased)) == pytest.approx(loss, rel=1e-6)
    numpy.testing.assert_allclose(ops.to_host(aliased), ops.to_host(grad), rtol=1e-6, atol=1e-8)


def test_softmax_cross_entropy_makes_rows_with_nan_or_inf_nan_and_keeps_ties(device):
    """The row maximum is read at the row's argmax: a tie takes either equal value, a NaN or an
    inf in a row makes that row's gradient NaN, and only its row."""
    ops = get_backend(device)
    z = numpy.array([[2.0, 2.0, -1.0], [0.0, numpy.nan, 1.0], [numpy.inf, 0.0, 0.0], [1.0, -numpy.inf, 1.0]],
                    numpy.float32)
    labels = numpy.array([1, 0, 2, 0])
    grad = ops.empty(z.shape, numpy.float32)
    with numpy.errstate(all="ignore"):
        loss = ops.softmax_cross_entropy(ops.asarray(z), ops.asarray(labels), grad)
    grad = ops.to_host(grad)
    assert numpy.isnan(float(loss))
    assert numpy.isnan(grad[1:3]).all() and numpy.isfinite(grad[[0, 3]]).all()
    for row in (0, 3):
        p = numpy.exp(z[row] - 2.0 * (row == 0) - 1.0 * (row == 3))
        p /= p.sum()
        p[labels[row]] -= 1
        numpy.testing.assert_allclose(grad[row], p / 4, rtol=1e-6, atol=1e-8)


def test_uniform_is_a_pure_function_of_seed_and_counter(device):
    ops = get_backend(device)
    a = ops.to_host(ops.uniform((1000, 100), 3, 7))
    assert a.dtype == numpy.float32 and a.min() >= 0.0 and a.max() < 1.0
    assert abs(a.mean() - 0.5) < 0.01 and abs(a.std() - (1 / 12) ** 0.5) < 0.01
    numpy.testing.assert_array_equal(a, ops.to_host(ops.uniform((1000, 100), 3, 7)))
    assert not numpy.array_equal(a, ops.to_host(ops.uniform((1000, 100), 3, 8)))
    assert not numpy.array_equal(a, ops.to_host(ops.uniform((1000, 100), 4, 7)))
    # neighbouring counters are not shifted copies of each other
    b = ops.to_host(ops.uniform((1000, 100), 3, 8)).ravel()
    assert abs(numpy.corrcoef(a.ravel()[1:], b[:-1])[0, 1]) < 0.01


def test_take_rows_writes_the_rows_into_out(device):
    ops = get_backend(device)
    rng = numpy.random.default_rng(3)
    x, labels, index = rng.standard_normal((9, 5)).astype(numpy.float32), rng.integers(0, 4, 9), rng.permutation(9)
    for array in (x, labels):
        out = ops.empty((6,) + array.shape[1:], array.dtype)
        assert ops.take_rows(ops.asarray(array), ops.asarray(index[:6]), out) is out
        numpy.testing.assert_array_equal(ops.to_host(out), array[index[:6]])


def test_leading_rows_reuses_the_largest_work_array(device):
    """A step's work arrays: the stored one for its shape, its leading rows for a shorter batch, a new
    one for more rows, other trailing axes or another dtype."""
    ops, store = get_backend(device), {}
    full = ops.leading_rows(store, "z", (32, 16), numpy.float32)
    assert full.shape == (32, 16) and full.dtype == numpy.float32 and store["z"] is full
    assert ops.leading_rows(store, "z", (32, 16), numpy.float32) is full
    short = ops.leading_rows(store, "z", (20, 16), numpy.float32)
    short[...] = 7
    assert short.shape == (20, 16) and store["z"] is full and (ops.to_host(full)[:20] == 7).all()
    for shape, dtype in (((40, 16), numpy.float32), ((32, 8), numpy.float32), ((32, 16), numpy.float64)):
        other = ops.leading_rows(store, "z", shape, dtype)
        assert other.shape == shape and other.dtype == dtype and store["z"] is other


def test_bias_grad_and_maxout_ops(device):
    ops = get_backend(device)
    rng = numpy.random.default_rng(2)
    dz = rng.standard_normal((9, 4))
    out = ops.empty((4,), numpy.float64)
    numpy.testing.assert_allclose(ops.to_host(ops.bias_grad(ops.asarray(dz), out)), dz.sum(0), rtol=1e-12)
    z3 = rng.standard_normal((3, 4, 5))
    y, index = ops.empty((3, 4), numpy.float64), ops.empty((3, 4), numpy.int32)
    ops.maxout_forward(ops.asarray(z3), y, index)
    numpy.testing.assert_array_equal(ops.to_host(y), z3.max(2))
    numpy.testing.assert_array_equal(ops.to_host(index), z3.argmax(2))
    dy = rng.standard_normal((3, 4))
    dz3 = ops.to_host(ops.maxout_backward(ops.asarray(dy), index, ops.empty(z3.shape, numpy.float64)))
    expected = numpy.zeros_like(z3)
    numpy.put_along_axis(expected, z3.argmax(2)[..., None], dy[..., None], axis=2)
    numpy.testing.assert_array_equal(dz3, expected)


def test_maxout_gradients_and_shifted_zeros_stay_zero_next_to_infinities(device):
    """Maxout's backward and RandomShift's zero fill write exact zeros where nothing is routed or shifted in,
    even beside inf and NaN (a mask multiply gave 0 * inf = NaN on the CPU, where the kernels write 0): the
    devices agree. (A tiled max pool's CPU backward still multiplies: exact copies cost 2-5x.)"""
    ops = get_backend(device)
    dy = numpy.array([[numpy.inf, numpy.nan]], numpy.float32)
    dz3 = ops.maxout_backward(ops.asarray(dy), ops.asarray(numpy.array([[1, 0]], numpy.int32)),
                              ops.empty((1, 2, 2), numpy.float32))
    numpy.testing.assert_array_equal(ops.to_host(dz3), [[[0, numpy.inf], [numpy.nan, 0]]])
    image = numpy.full((1, 1, 3, 3), numpy.inf, numpy.float32)
    shifted = ops.to_host(ops.shift_images(ops.asarray(image), ops.asarray(numpy.array([[1, -1]], numpy.int32)),
                                           ops.empty((1, 1, 3, 3), numpy.float32)))
    numpy.testing.assert_array_equal(shifted[0, 0], [[0, 0, 0], [numpy.inf, numpy.inf, 0], [numpy.inf, numpy.inf, 0]])


@pytest.mark.parametrize("layout", ["contiguous", "image_array"])
def test_shifted_images_are_each_images_own_shift_with_zeros_coming_in(device, layout):
    """Every image and channel moves by its image's (rows, columns) shift, shifts past the edge included
    (all zeros), against a loop over the pixels; into and from arrays laid out as images pass between
    layers too (batch-last on the CPU), where the gather runs in the output's memory order."""
    ops = get_backend(device)
    x = numpy.arange(1, 3 * 2 * 4 * 5 + 1, dtype=numpy.float32).reshape(3, 2, 4, 5)
    shifts = numpy.array([[0, 0], [-1, 2], [5, -7]], numpy.int32)
    expected = numpy.zeros_like(x)
    for i, (down, right) in enumerate(shifts):
        for r, col in numpy.ndindex(4, 5):
            if 0 <= r - down < 4 and 0 <= col - right < 5:
                expected[i, :, r, col] = x[i, :, r - down, col - right]
    source, out = ops.asarray(x), ops.empty(x.shape, numpy.float32)
    if layout == "image_array":
        source, out = ops.image_array(x.shape, numpy.float32), ops.image_array(x.shape, numpy.float32)
        source[...] = ops.asarray(x)
    got = ops.shift_images(source, ops.asarray(shifts), out)
    assert got is out
    numpy.testing.assert_array_equal(ops.to_host(got), expected)


X86_LINUX = platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")
# Something in this process (a library built with -ffast-math) may have set FTZ already.
IEEE_SUBNORMALS = numpy.float32(numpy.finfo(numpy.float32).tiny) * numpy.float32(0.5) != 0


def _is_subnormal(x):
    return x != 0 and abs(x) < numpy.finfo(x.dtype).tiny


@pytest.mark.skipif(not X86_LINUX, reason="the CPU flushes subnormals through the MXCSR of x86-64 Linux")
@pytest.mark.skipif(not IEEE_SUBNORMALS, reason="this process flushes subnormals already")
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_cpu_flushes_subnormals_inside_the_block_only(dtype):
    """Results (FTZ) and inputs (DAZ) in the subnormal range are zero inside; IEEE again after,
    also after an exception and after a nested block."""
    ops, tiny, quarter = NumpyBackend(), numpy.finfo(dtype).tiny, dtype(0.25)
    subnormal = numpy.array([tiny * quarter])
    assert _is_subnormal(subnormal[0]) and _is_subnormal(tiny * quarter)
    with ops.flushing_subnormals():
        assert tiny * quarter == 0 and subnormal[0] + dtype(0) == 0
        with ops.flushing_subnormals():
            assert tiny * quarter == 0
        assert tiny * quarter == 0  # the inner block restored the outer's environment
    assert _is_subnormal(tiny * quarter) and _is_subnormal(subnormal[0] + dtype(0))
    with pytest.raises(ZeroDivisionError), ops.flushing_subnormals():
        raise ZeroDivisionError
    assert _is_subnormal(tiny * quarter)


@pytest.mark.skipif(not IEEE_SUBNORMALS, reason="this process flushes subnormals already")
@pytest.mark.parametrize("optimizer", [lambda: nn.SGD(lr=0.1, momentum=0.5), lambda: nn.Adam(lr=0.1)],
                         ids=["sgd-momentum", "adam"])
def test_moments_of_a_parameter_without_gradient_leave_the_subnormal_range_on_the_cpu(device, optimizer):
    """A moment decaying where the gradient stays zero (a dead ReLU unit) reaches the subnormal range,
    where x86 arithmetic is about 100 times slower: the CPU update flushes it to zero (on x86-64
    Linux), a GPU keeps it, as PyTorch does; the parameters are the same either way, and the
    user's arithmetic after the step keeps its subnormals."""
    model = nn.Sequential(nn.Dense(3, 2), device=device, dtype=numpy.float32)
    ops, opt = model.backend, optimizer()
    tiny = numpy.finfo(numpy.float32).tiny
    names = ("velocity",) if isinstance(opt, nn.SGD) else ("m", "v")
    opt.state = {name: ops.asarray(numpy.full(model.flat_params.shape, tiny, numpy.float32)) for name in names}
    opt.steps = 10  # Adam: a late step, whose bias corrections are near 1
    before = ops.to_host(model.flat_params).copy()
    model.flat_grads[...] = 0
    opt.step(model)
    first = ops.to_host(opt.state[names[0]])  # tiny * 0.5 (momentum) or tiny * 0.9 (beta1): subnormal
    flushed = ops.name == "cpu" and X86_LINUX
    assert (first == 0).all() if flushed else all(_is_subnormal(value) for value in first)
    numpy.testing.assert_allclose(ops.to_host(model.flat_params), before, rtol=0, atol=1e-6)
    assert _is_subnormal(numpy.float32(tiny) * numpy.float32(0.5))
