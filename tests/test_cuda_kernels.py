"""Every CUDA kernel against nnaccel's NumPy reference, on the emulated device and on a real GPU.

The sizes target the kernels' structure: 1, 31, 32, 33 elements or columns
(a warp and its edges), rows longer than a warp, more rows than the grid has
warps, arrays that need several grid-stride passes (the grids are capped at
32 blocks per multiprocessor: the emulated device reports 2), batches that
need several bias-gradient chunks, and outputs that alias their inputs. The
values include zeros of both signs, overflow edges, infinities and NaN.

Tolerance: |kernel - NumPy| <= ULPS eps |ref| + ABS eps max(1, |z|) (times
|dy| for derivatives): a few ulps of the math libraries (glibc here and in
NumPy, CUDA's libdevice on a GPU), plus the formulas' own cancellation that
NumPy shares (gelu's 1 + erf(z/sqrt 2) cancels for z < 0, and its product
with z scales that by |z|). Sigmoid's and silu's tails, which cancel in no
formula of either, are held to PyTorch's within ulps in test_torch_oracle.py.
"""

import numpy
import pytest

from nnaccel import activations
from nnaccel.backend import Backend, get_backend
from nnaccel.backend.base import Window
from nnaccel.backend import cuda_kernels as ck
from nnaccel.errors import DeviceError

DTYPES = (numpy.float32, numpy.float64)
IDS = ("float32", "float64")
CASES = [("linear", {}), ("relu", {}), ("leaky_relu", {"slope": 0.0}), ("leaky_relu", {"slope": 0.01}),
         ("leaky_relu", {"slope": 2.0}), ("elu", {"alpha": 1.0}), ("elu", {"alpha": 0.3}), ("sigmoid", {}),
         ("tanh", {}), ("softplus", {}), ("gelu", {}), ("silu", {})]
EDGES = [1, 31, 32, 33, 255, 257]  # around a warp and a block


@pytest.fixture
def cp(cuda_device):
    import cupy

    return cupy


@pytest.fixture
def on_emulator(cp):
    return cp.__version__.endswith("standin")


@pytest.fixture(scope="module")
def ops():
    return get_backend("cpu")


def ulps(emulated):
    """glibc and NumPy agree within 4 ulps; CUDA's libdevice adds up to 4 more."""
    return 4 if emulated else 8


def several_passes(cp, per_item=1):
    """A count of work items that takes 3 passes of a capped grid-stride launch on this device."""
    sms = cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrMultiProcessorCount, 0)
    return 3 * ck.BLOCKS_PER_SM * sms * ck.THREADS // per_item + 17


def random(shape, dtype, seed=0, scale=3.0):
    return (numpy.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def special_values(dtype):
    info = numpy.finfo(dtype)
    values = [0.0, -0.0, 1e-30, -1e-30, info.smallest_subnormal, -info.smallest_subnormal, 0.5, -0.5, 1.0, -1.0,
              20.0, -20.0, 88.0, -88.0, 89.0, -89.0, 709.0, -709.0, 710.0, -710.0, 1e4, -1e4, float(info.max),
              float(-info.max), numpy.inf, -numpy.inf, numpy.nan]
    with numpy.errstate(over="ignore"):  # 709 and 710 overflow float32 to inf: fine
        return numpy.array(values).astype(dtype)


def assert_close(kernel, ref, z, scale, ulp_count, abs_count=2.0, what="kernel"):
    """NaN and infinities where the reference has them; the rest within the bound of the module docstring."""
    scale = numpy.broadcast_to(numpy.asarray(scale, dtype=numpy.float64), numpy.shape(ref)).ravel()
    kernel, ref, z = (numpy.asarray(a).ravel() for a in (kernel, ref, z))
    nan_k, nan_r = numpy.isnan(kernel), numpy.isnan(ref)
    assert numpy.array_equal(nan_k, nan_r), f"{what}: NaN differs at z = {z[nan_k != nan_r][:5]}"
    inf = numpy.isinf(kernel) | numpy.isinf(ref)
    assert numpy.array_equal(kernel[inf], ref[inf]), f"{what}: infinities differ at z = {z[inf & (kernel != ref)][:5]}"
    finite = ~(nan_r | inf)
    eps = float(numpy.finfo(kernel.dtype).eps)
    k, r = kernel[finite].astype(numpy.float64), ref[finite].astype(numpy.float64)
    with numpy.errstate(over="ignore", invalid="ignore"):
        bound = ulp_count * eps * numpy.abs(r) + abs_count * eps * numpy.maximum(1.0, numpy.abs(z[finite])) * scale[finite]
    bad = (k != r) & ~(numpy.abs(k - r) <= bound)
    if bad.any():
        worst = int(numpy.argmax(bad))
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} elements outside the bound; first at "
                             f"z = {z[finite][worst]!r}: kernel {k[worst]!r}, reference {r[worst]!r}")


# ----- bias + activation, and the activation backward ----------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name, params", CASES, ids=[f"{n}{p or ''}" for n, p in CASES])
def test_bias_act_and_backward(cp, ops, on_emulator, dtype, name, params):
    act = activations.get(name, **params)
    rows, cols = (4096, 4096) if not on_emulator else (301, 333)
    z = random((rows, cols), dtype)
    z.flat[:len(special_values(dtype))] = special_values(dtype)
    z[1] *= 10  # a row of larger values
    bias, dy = random(cols, dtype, 1), random((rows, cols), dtype, 2)
    with numpy.errstate(all="ignore"):
        z_ref = z + bias
        y_ref = act.forward(ops, z_ref.copy(), numpy.empty_like(z))
        dz_ref = act.backward(ops, dy, y_ref, z_ref, numpy.empty_like(z))
    n = ulps(on_emulator)

    z_dev = cp.asarray(z)
    y_dev = ck.bias_act(z_dev, cp.asarray(bias), act.code, act.param, cp.empty_like(z_dev))
    assert_close(y_dev.get(), y_ref, z_ref, 1.0, n, what=f"{name} forward")
    numpy.testing.assert_array_equal(z_dev.get(), z_ref)  # z keeps z + bias: one IEEE addition
    z_dev = cp.asarray(z)
    ck.bias_act(z_dev, cp.asarray(bias), act.code, act.param, z_dev)  # out aliases z
    assert_close(z_dev.get(), y_ref, z_ref, 1.0, n, what=f"{name} forward in place")

    y_dev, z_dev = cp.asarray(y_ref), cp.asarray(z_ref)
    saved = (None, z_dev) if act.code in ck.GRAD_FROM_Z else (y_dev, None)
    dz = ck.act_backward(cp.asarray(dy), *saved, act.code, act.param, cp.empty_like(z_dev))
    assert_close(dz.get(), dz_ref, z_ref, numpy.abs(dy), n, what=f"{name} derivative")
    dy_dev = cp.asarray(dy)
    ck.act_backward(dy_dev, *saved, act.code, act.param, dy_dev)  # dz aliases dy
    assert_close(dy_dev.get(), dz_ref, z_ref, numpy.abs(dy), n, what=f"{name} derivative in place")


@pytest.mark.parametrize("cols", EDGES)
def test_bias_act_at_warp_and_block_edges(cp, ops, cols):
    """Every element of odd shapes, and of an array needing several grid-stride passes, is written once."""
    act = activations.get("elu", alpha=0.5)
    for rows in (1, 3, several_passes(cp) // cols + 1):
        z, bias = random((rows, cols), numpy.float32), random(cols, numpy.float32, 1)
        y_ref = act.forward(ops, z + bias, numpy.empty_like(z))
        y = ck.bias_act(cp.asarray(z), cp.asarray(bias), act.code, act.param, cp.full(z.shape, numpy.nan, numpy.float32))
        assert_close(y.get(), y_ref, z + bias, 1.0, 4, what=f"({rows}, {cols})")


def test_bias_act_without_bias(cp, ops):
    z = random((3000, 333), numpy.float32)
    act = activations.get("gelu")
    z_dev = cp.asarray(z)
    y = ck.bias_act(z_dev, None, act.code, act.param, cp.empty(z.shape, numpy.float32))
    assert_close(y.get(), act.forward(ops, z.copy(), numpy.empty_like(z)), z, 1.0, 8)
    numpy.testing.assert_array_equal(z_dev.get(), z)


@pytest.mark.parametrize("name", ["relu", "gelu", "silu"])
def test_the_backend_adds_the_bias_and_activates_in_one_launch(cp, ops, cuda_device, monkeypatch, name):
    """Into ``z`` itself (relu reads its output) or into another array keeping ``z + bias`` for the derivative
    (gelu, silu): one kernel either way, leaving what the CPU backend leaves."""
    act, cuda = activations.get(name), get_backend(cuda_device)
    z, bias = random((300, 33), numpy.float32), random(33, numpy.float32, 1)
    launches = []
    launch = ck._launch
    monkeypatch.setattr(ck, "_launch", lambda name, *args: launches.append(name) or launch(name, *args))
    z_dev = cp.asarray(z)
    out = z_dev if act.uses_output else cp.empty_like(z_dev)
    y = cuda.bias_act(z_dev, cp.asarray(bias), act, out)
    assert launches == ["bias_act"]
    z_ref = z.copy()
    y_ref = ops.bias_act(z_ref, bias, act, z_ref if act.uses_output else numpy.empty_like(z))
    assert_close(y.get(), y_ref, z_ref, 1.0, ulps(cp.__version__.endswith("standin")))
    if not act.uses_output:
        numpy.testing.assert_array_equal(z_dev.get(), z_ref)


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 700, 5000])
@pytest.mark.parametrize("cols", [1, 31, 33, 100])
def test_fused_bias_grad(cp, ops, rows, cols):
    """Columns around a block's 32, rows in one chunk and in several (then a second reduction kernel)."""
    act = activations.get("relu")
    z, dy = random((rows, cols), numpy.float32), random((rows, cols), numpy.float32, 1)
    y = act.forward(ops, z.copy(), numpy.empty_like(z))
    dz_ref = act.backward(ops, dy, y, z, numpy.empty_like(z))
    dy_dev, y_dev = cp.asarray(dy), cp.asarray(y)
    dz, db = cp.full(dy.shape, numpy.nan, numpy.float32), cp.full(cols, numpy.nan, numpy.float32)
    ck.act_backward(dy_dev, y_dev, None, act.code, act.param, dz, db)
    numpy.testing.assert_array_equal(dz.get(), dz_ref)
    exact = dz_ref.astype(numpy.float64).sum(axis=0)
    magnitude = numpy.abs(dz_ref).astype(numpy.float64).sum(axis=0)
    assert numpy.all(numpy.abs(db.get() - exact) <= 1e-6 * magnitude + 1e-7), "the bias gradient is off"
    again = cp.empty_like(db)
    ck.act_backward(dy_dev, y_dev, None, act.code, act.param, cp.empty_like(dz), again)
    assert bool((db == again).all()), "the bias gradient depends on the order the threads ran in"


def test_bias_grad_of_no_rows_is_zero(cp):
    db = cp.full(3, numpy.nan, numpy.float32)
    ck.act_backward(cp.zeros((0, 3), numpy.float32), cp.zeros((0, 3), numpy.float32), None, 1, 0.0,
                    cp.zeros((0, 3), numpy.float32), db)
    assert not bool(db.any())


# ----- row kernels: one warp per row ----------------------------------------------------------------
ROW_SHAPES = [(1, 1), (5, 31), (5, 32), (5, 33), (700, 10), (3, 1000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows, cols", ROW_SHAPES)
def test_softmax_and_backward(cp, ops, dtype, rows, cols):
    z, dy = random((rows, cols), dtype), random((rows, cols), dtype, 1)
    z[0, 0] = 1e4  # one huge logit
    if rows > 1:
        z[1, :] *= 1e3  # a row of large ones
    y_ref = ops.softmax(z, numpy.empty_like(z))
    inner = (dy * y_ref).sum(axis=1, keepdims=True)
    dz_ref = y_ref * (dy - inner)
    z_dev = cp.asarray(z)
    ck.softmax(z_dev, z_dev)  # in place
    assert_close(z_dev.get(), y_ref, numpy.zeros_like(z), 0.0, 8 + cols / 32, what="softmax")
    dy_dev = cp.asarray(dy)
    ck.softmax_backward(dy_dev, cp.asarray(y_ref), dy_dev)  # in place
    # dy - inner cancels: bound by the size of the terms; each lane adds cols / 32 of them
    inner_abs = numpy.abs(dy * y_ref).sum(axis=1, keepdims=True)
    eps = numpy.finfo(dtype).eps
    bound = 4 * eps * y_ref * (numpy.abs(dy) + (cols / 32 + 8) * inner_abs) + numpy.finfo(dtype).tiny
    assert numpy.all(numpy.abs(dy_dev.get() - dz_ref) <= bound), "softmax backward"


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows, cols", ROW_SHAPES + [(64, 37)])
@pytest.mark.parametrize("label_dtype", [numpy.int64, numpy.int32])
def test_softmax_cross_entropy(cp, ops, dtype, rows, cols, label_dtype):
    logits = random((rows, cols), dtype)
    logits[0] *= 1e3
    labels = numpy.random.default_rng(1).integers(0, cols, rows).astype(label_dtype)
    grad_ref = numpy.empty_like(logits)
    loss_ref = ops.softmax_cross_entropy(logits, labels, grad_ref)
    logits_dev = cp.asarray(logits)
    loss = ck.softmax_cross_entropy(logits_dev, cp.asarray(labels), logits_dev)  # the gradient in place
    assert loss.shape == () and loss.dtype == dtype
    numpy.testing.assert_allclose(float(loss), float(loss_ref), rtol=16 * numpy.finfo(dtype).eps * (1 + cols / 32))
    # softmax - 1 cancels for the label's class: bound it by the terms' size, 1 / rows
    assert_close(logits_dev.get(), grad_ref, numpy.zeros_like(logits), (8 + cols / 32) / rows, 8 + cols / 32,
                 what="gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_cross_entropy_infinite_and_nan_rows(cp, ops, dtype):
    rng = numpy.random.default_rng(2)
    logits = (rng.standard_normal((64, 37)) * 5).astype(dtype)
    logits[1] *= 1e4  # one dominant logit: exp underflows everywhere else
    logits[2, 3] = -numpy.inf  # a class that can never be picked...
    labels = rng.integers(0, 37, size=64)
    labels[2] = 3  # ...labelled: infinite loss
    logits[3, 5] = numpy.nan  # a NaN poisons its row
    grad_ref = numpy.empty_like(logits)
    with numpy.errstate(all="ignore"):
        ops.softmax_cross_entropy(logits, labels, grad_ref)
    grad = cp.empty(logits.shape, dtype)
    assert numpy.isnan(float(ck.softmax_cross_entropy(cp.asarray(logits), cp.asarray(labels), grad)))
    rtol = 8 * numpy.finfo(dtype).eps
    numpy.testing.assert_allclose(grad.get(), grad_ref, rtol=rtol, atol=rtol / 64, equal_nan=True)


def test_cross_entropy_bad_label_is_nan(cp):
    loss = ck.softmax_cross_entropy(cp.zeros((4, 3), numpy.float32), cp.asarray([0, -1, 3, 2]),
                                    cp.empty((4, 3), numpy.float32))
    assert numpy.isnan(float(loss))


# ----- optimizers, over one flat buffer ----------------------------------------------------------------
SGD_CASES = [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 1e-2, False), (0.9, 1e-2, True), (0.0, 1e-2, False)]
ADAM_CASES = [(0.0, False), (1e-2, False), (1e-2, True)]  # (weight_decay, decoupled)


def flat_state(cp, dtype, seed=4):
    n = several_passes(cp)
    rng = numpy.random.default_rng(seed)
    return rng.standard_normal(n).astype(dtype), [rng.standard_normal(n).astype(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("momentum, weight_decay, nesterov", SGD_CASES)
def test_sgd_update(cp, ops, dtype, momentum, weight_decay, nesterov):
    p, grads = flat_state(cp, dtype)
    p_ref, v_ref = p.copy(), numpy.zeros_like(p)
    p_dev, v_dev = cp.asarray(p), cp.zeros(p.size, dtype)
    for g in grads:  # the generic formula (PyTorch's order of operations), which the kernel follows
        Backend.sgd_update(ops, p_ref, g, v_ref, 0.1, momentum, weight_decay, nesterov)
        ck.sgd_update(p_dev, cp.asarray(g), v_dev if momentum else None, 0.1, momentum, weight_decay, nesterov)
    rtol = 2 * numpy.finfo(dtype).eps
    numpy.testing.assert_allclose(p_dev.get(), p_ref, rtol=rtol, atol=rtol)
    numpy.testing.assert_allclose(v_dev.get(), v_ref, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("weight_decay, decoupled", ADAM_CASES)
def test_adam_update(cp, ops, dtype, weight_decay, decoupled):
    p, grads = flat_state(cp, dtype)
    p_ref, m_ref, v_ref = p.copy(), numpy.zeros_like(p), numpy.zeros_like(p)
    p_dev, m_dev, v_dev = cp.asarray(p), cp.zeros(p.size, dtype), cp.zeros(p.size, dtype)
    for step, g in enumerate(grads, start=1):
        ops.adam_update(p_ref, g, m_ref, v_ref, 1e-2, 0.9, 0.999, 1e-8, weight_decay, decoupled, step)
        ck.adam_update(p_dev, cp.asarray(g), m_dev, v_dev, 1e-2, 0.9, 0.999, 1e-8, weight_decay, decoupled, step)
    rtol = 4 * numpy.finfo(dtype).eps
    for dev, ref in ((p_dev, p_ref), (m_dev, m_ref), (v_dev, v_ref)):
        numpy.testing.assert_allclose(dev.get(), ref, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("momentum, weight_decay, nesterov", SGD_CASES)
def test_sgd_update_matches_torch(cp, momentum, weight_decay, nesterov):
    torch = pytest.importorskip("torch")
    p, grads = flat_state(cp, numpy.float64)
    param = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt = torch.optim.SGD([param], lr=0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    p_dev, v_dev = cp.asarray(p), cp.zeros(p.size, numpy.float64)
    for g in grads:
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        ck.sgd_update(p_dev, cp.asarray(g), v_dev, 0.1, momentum, weight_decay, nesterov)
    numpy.testing.assert_allclose(p_dev.get(), param.detach().numpy(), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("weight_decay, decoupled", ADAM_CASES)
def test_adam_update_matches_torch(cp, weight_decay, decoupled):
    torch = pytest.importorskip("torch")
    p, grads = flat_state(cp, numpy.float64)
    param = torch.nn.Parameter(torch.from_numpy(p.copy()))
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = kind([param], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    p_dev, m_dev, v_dev = cp.asarray(p), cp.zeros(p.size, numpy.float64), cp.zeros(p.size, numpy.float64)
    for step, g in enumerate(grads, start=1):
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        ck.adam_update(p_dev, cp.asarray(g), m_dev, v_dev, 1e-2, 0.9, 0.999, 1e-8, weight_decay, decoupled, step)
    # torch updates m with lerp, a different rounding of the same formula
    numpy.testing.assert_allclose(p_dev.get(), param.detach().numpy(), rtol=1e-12, atol=1e-13)


# ----- maxout -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("pieces", [1, 2, 5])
def test_maxout(cp, ops, on_emulator, dtype, pieces):
    rng = numpy.random.default_rng(3)
    rows, units = (4096, 1024) if not on_emulator else (97, 251)
    z3 = rng.integers(-3, 4, size=(rows, units, pieces)).astype(dtype)  # many ties: the first index wins
    z3[0, :5, -1] = numpy.nan  # NaN wins, the first one
    z3[1, 1, :] = -numpy.inf
    y_ref, idx_ref = numpy.empty((rows, units), dtype), numpy.empty((rows, units), numpy.int32)
    ops.maxout_forward(z3, y_ref, idx_ref)
    y, idx = cp.full((rows, units), 7, dtype), cp.full((rows, units), -1, numpy.int32)
    ck.maxout_forward(cp.asarray(z3), y, idx)
    numpy.testing.assert_array_equal(idx.get(), idx_ref)
    numpy.testing.assert_array_equal(y.get(), y_ref)

    dy = random((rows, units), dtype, 4)
    dz_ref = numpy.empty_like(z3)
    ops.maxout_backward(dy, idx_ref, dz_ref)
    dz = cp.full(z3.shape, numpy.nan, dtype)
    ck.maxout_backward(cp.asarray(dy), idx, dz)
    numpy.testing.assert_array_equal(dz.get(), dz_ref)


# ----- convolution, pooling and batch norm: the kernels against the generic NumPy ops ------------------------
WINDOWS = [Window(3, 3, 1, 1, 1, 1), Window(3, 2, 2, 1, 1, 0), Window(2, 2, 2, 2, 0, 0), Window(5, 5, 3, 2, 2, 2)]


def images(cp, shape, dtype=numpy.float32, seed=0):
    host_array = random(shape, dtype, seed)
    return host_array, cp.asarray(host_array)


def image_major(ops, columns, n):
    """A convolution's columns (*lead, N*L) in the CPU backend's order (``Backend.by_image``) re-laid
    image-major, the kernels' order."""
    return numpy.ascontiguousarray(ops.by_image(columns, columns.shape[:-1], n, (-1,))).reshape(columns.shape)


def cpu_order(ops, columns, n):
    """``image_major``'s inverse: image-major columns in the CPU backend's order."""
    out = numpy.empty_like(columns)
    ops.by_image(out, columns.shape[:-1], n, (-1,))[...] = columns.reshape(*columns.shape[:-1], n, -1)
    return out


@pytest.mark.parametrize("window", WINDOWS, ids=[str(tuple(w)) for w in WINDOWS])
def test_im2col_and_col2im(cp, ops, window):
    """Enough columns for several grid-stride passes; col2im sums in the generic order, so bits agree
    (the CPU backend keeps the columns in another order: they are compared image by image)."""
    x, x_dev = images(cp, (9, 5, 31, 33))
    oh, ow = window.output_size(31, 33)
    columns_ref = ops.im2col(x, window, numpy.empty((5 * window.kh * window.kw, 9 * oh * ow), numpy.float32))
    columns = ck.im2col(x_dev, window, cp.full(columns_ref.shape, numpy.nan, numpy.float32))
    numpy.testing.assert_array_equal(columns.get(), image_major(ops, columns_ref, 9))
    g, g_dev = images(cp, columns_ref.shape, seed=1)
    dx_ref = ops.col2im(cpu_order(ops, g, 9), window, numpy.empty(x.shape, numpy.float32))
    numpy.testing.assert_array_equal(ck.col2im(g_dev, window, cp.full(x.shape, numpy.nan, numpy.float32)).get(),
                                     dx_ref)


@pytest.mark.parametrize("window", WINDOWS, ids=[str(tuple(w)) for w in WINDOWS])
def test_pooling_kernels(cp, ops, window):
    x, x_dev = images(cp, (7, 6, 29, 30))
    x[0, 0, :4, :4] = 1.0  # ties: the first wins
    x[0, 1, 2, 3] = numpy.nan
    x_dev = cp.asarray(x)
    shape = (7, 6, *window.output_size(29, 30))
    y_ref, idx_ref = numpy.empty(shape, numpy.float32), numpy.empty(shape, numpy.int32)
    ops.maxpool_forward(x, window, y_ref, idx_ref)
    y, idx = cp.full(shape, 7.0, numpy.float32), cp.full(shape, -5, numpy.int32)
    ck.maxpool_forward(x_dev, window, y, idx)
    numpy.testing.assert_array_equal(y.get(), y_ref)
    numpy.testing.assert_array_equal(idx.get(), idx_ref)
    dy, dy_dev = images(cp, shape, seed=2)
    numpy.testing.assert_array_equal(ck.maxpool_backward(dy_dev, idx, window, cp.empty(x.shape, numpy.float32)).get(),
                                     ops.maxpool_backward(dy, idx_ref, window, numpy.empty(x.shape, numpy.float32)))
    numpy.testing.assert_array_equal(ck.avgpool_forward(x_dev, window, cp.empty(shape, numpy.float32)).get(),
                                     ops.avgpool_forward(x, window, numpy.empty(shape, numpy.float32)))
    numpy.testing.assert_array_equal(ck.avgpool_backward(dy_dev, window, cp.empty(x.shape, numpy.float32)).get(),
                                     ops.avgpool_backward(dy, window, numpy.empty(x.shape, numpy.float32)))


@pytest.mark.parametrize("n, c, l", [(9, 33, 257), (41, 3, 300)], ids=["one chunk", "chunks"])
@pytest.mark.parametrize("name", ["relu", "gelu", "linear", "sigmoid"])
def test_bias_act_over_channels(cp, ops, name, n, c, l):
    """A convolution's matmul (C, N*L) to NCHW with bias and activation, and back with the bias gradient
    (channels of more values than a block has threads; a few channels of many values, which the
    gradient splits into chunks of images, the last one shorter, on the emulated device's 2
    multiprocessors and on a GPU's)."""
    chunks, chunk_images = ck.channel_chunks(n, c, l, ck._sm_count(0))
    assert (chunks > 1 and n % chunk_images) if n == 41 else chunks == 1
    act = activations.get(name)
    z, _ = images(cp, (c, n * l))
    bias, bias_dev = images(cp, (c,), seed=1)
    z_ref = cpu_order(ops, z, n)  # the CPU backend's order; the kernels' arrays are compared re-laid as theirs
    rows_ref = z_ref if act.uses_output else numpy.empty_like(z)
    y_ref = ops.bias_act_to_nchw(z_ref, bias, act, rows_ref, numpy.empty((n, c, l), numpy.float32))
    z_ref, rows_ref = image_major(ops, z_ref, n), image_major(ops, rows_ref, n)
    z_dev = cp.asarray(z)
    rows_dev = z_dev if act.uses_output else cp.empty_like(z_dev)
    y = ck.bias_act_to_nchw(z_dev, bias_dev, act.code, act.param, rows_dev, cp.empty((n, c, l), numpy.float32))
    assert_close(y.get(), y_ref, numpy.zeros_like(y_ref), 1.0, 4, what=f"{name} forward")
    assert_close(rows_dev.get(), rows_ref, numpy.zeros_like(rows_ref), 1.0, 4, what=f"{name} rows")
    if not act.uses_output:
        numpy.testing.assert_array_equal(z_dev.get(), z_ref)  # z keeps z + bias
    dy, dy_dev = images(cp, (n, c, l), seed=2)
    db_ref = numpy.empty(c, numpy.float32)
    dz_ref = image_major(ops, ops.act_backward_from_nchw(dy, cpu_order(ops, rows_ref, n), cpu_order(ops, z_ref, n),
                                                         act, numpy.empty((c, n * l), numpy.float32), db_ref), n)
    db = cp.full(c, numpy.nan, numpy.float32)
    dz = ck.act_backward_from_nchw(dy_dev, cp.asarray(rows_ref), cp.asarray(z_ref), act.code, act.param,
                                   cp.empty((c, n * l), numpy.float32), db)
    assert_close(dz.get(), dz_ref, numpy.zeros_like(dz_ref), numpy.abs(dy).transpose(1, 0, 2).reshape(c, n * l), 4,
                 what=f"{name} backward")
    magnitude = numpy.abs(dz_ref).astype(numpy.float64).sum(axis=1)
    assert numpy.all(numpy.abs(db.get() - dz_ref.astype(numpy.float64).sum(axis=1)) <= 1e-6 * magnitude + 1e-7)


BATCHNORM_SHAPES = [(9, 70, 33), (300, 5, 1), (2, 3, 1000), (1, 4, 2), (64, 3, 400), (5000, 3, 1)]
IN_CHUNKS = {(64, 3, 400), (5000, 3, 1)}  # on the emulated device's 2 multiprocessors and on a GPU's


@pytest.mark.parametrize("n, c, l", BATCHNORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_batchnorm_kernels(cp, ops, n, c, l, dtype):
    """Channels of 2 values up to thousands (strided per-thread sums, then the tree), and a few channels
    of many values, split into chunks of images (the last one shorter) that are merged in order."""
    assert (ck.channel_chunks(n, c, l, ck._sm_count(0))[0] > 1) == ((n, c, l) in IN_CHUNKS)
    x, x_dev = images(cp, (n, c, l), dtype)
    x += numpy.arange(c, dtype=dtype)[None, :, None]  # means far from zero: the variance is computed centred
    x_dev = cp.asarray(x)
    gamma, beta = random(c, dtype, 3) + 1, random(c, dtype, 4)
    vectors = {name: numpy.zeros(c, dtype) for name in ("mean", "invstd", "rm")}
    vectors["rv"] = numpy.ones(c, dtype)
    on_dev = {name: cp.asarray(value) for name, value in vectors.items()}
    ops.batchnorm_stats(x, vectors["mean"], vectors["invstd"], 1e-5, vectors["rm"], vectors["rv"], 0.1)
    ck.batchnorm_stats(x_dev, on_dev["mean"], on_dev["invstd"], 1e-5, on_dev["rm"], on_dev["rv"], 0.1)
    rtol = 64 * numpy.finfo(dtype).eps
    for name in vectors:
        numpy.testing.assert_allclose(on_dev[name].get(), vectors[name], rtol=rtol, atol=rtol, err_msg=name)
    y_ref = ops.batchnorm_apply(x, vectors["mean"], vectors["invstd"], gamma, beta, numpy.empty_like(x))
    y = ck.batchnorm_apply(x_dev, on_dev["mean"], on_dev["invstd"], cp.asarray(gamma), cp.asarray(beta),
                           cp.empty_like(x_dev))
    numpy.testing.assert_allclose(y.get(), y_ref, rtol=rtol, atol=rtol * 10)
    dy, dy_dev = images(cp, (n, c, l), dtype, seed=5)
    for training in (True, False):
        grads_ref = [numpy.empty_like(x), numpy.empty(c, dtype), numpy.empty(c, dtype)]
        ops.batchnorm_backward(dy, x, vectors["mean"], vectors["invstd"], gamma, *grads_ref, training)
        grads = [cp.empty_like(x_dev), cp.empty(c, dtype), cp.empty(c, dtype)]
        ck.batchnorm_backward(dy_dev, x_dev, on_dev["mean"], on_dev["invstd"], cp.asarray(gamma), *grads, training)
        scale = numpy.abs(dy).sum(axis=(0, 2)).max()
        for got, ref, what in zip(grads, grads_ref, ("dx", "dgamma", "dbeta")):
            numpy.testing.assert_allclose(got.get(), ref, rtol=rtol, atol=rtol * scale, err_msg=f"{what} {training}")


# ----- arrays on the wrong device ---------------------------------------------------------------------

def test_a_host_array_among_device_arrays_is_refused_by_name(cp):
    z, out = cp.zeros((8, 6), numpy.float32), cp.full((8, 6), numpy.nan, numpy.float32)
    with pytest.raises(DeviceError, match=r"^bias is a NumPy array on the host \(cpu\)"):
        ck.bias_act(z, numpy.zeros(6, numpy.float32), 1, 0.0, out)
    with pytest.raises(DeviceError, match=r"^z is a NumPy array on the host \(cpu\)"):
        ck.bias_act(numpy.zeros((8, 6), numpy.float32), cp.zeros(6, numpy.float32), 1, 0.0, out)
    assert bool(cp.isnan(out).all())  # nothing launched


def test_an_array_on_another_gpu_is_refused_by_name(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one GPU: no other device to put an array on")
    with cp.cuda.Device(1):
        bias = cp.zeros(6, numpy.float32)
    with pytest.raises(DeviceError, match=r"^bias is on cuda:1 but z is on cuda:0"):
        ck.bias_act(cp.zeros((8, 6), numpy.float32), bias, 1, 0.0, cp.zeros((8, 6), numpy.float32))
    with cp.cuda.Device(1):
        labels = cp.zeros(8, numpy.int64)
    with pytest.raises(DeviceError, match=r"^labels is on cuda:1 but logits is on cuda:0"):
        ck.softmax_cross_entropy(cp.zeros((8, 6), numpy.float32), labels, cp.zeros((8, 6), numpy.float32))
    loss = ck.softmax_cross_entropy(cp.zeros((8, 6), numpy.float32), numpy.zeros(8, numpy.int64),
                                    cp.zeros((8, 6), numpy.float32))  # host labels are copied over
    assert float(loss) == pytest.approx(numpy.log(6))
