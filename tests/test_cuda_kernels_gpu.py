"""Every CUDA kernel wrapper against nnaccel's NumPy reference, on a GPU.

Sizes need many blocks and several grid-stride passes (the grids are capped
at 32 blocks per multiprocessor). Skipped where no GPU answers.
"""

import numpy
import pytest

from nnaccel import activations
from nnaccel.backend import cuda_kernels as ck
from nnaccel.backend import get_backend


def _gpu_count():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, no driver, no device
        return 0


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_gpu_count() == 0, reason="no CUDA GPU answers (CuPy missing or no device)")]

DTYPES = (numpy.float32, numpy.float64)
IDS = ("float32", "float64")
RTOL = {numpy.float32: 1e-5, numpy.float64: 1e-12}
CASES = [("linear", {}), ("relu", {}), ("leaky_relu", {"slope": 0.01}), ("elu", {"alpha": 1.0}), ("sigmoid", {}),
         ("tanh", {}), ("softplus", {}), ("gelu", {}), ("silu", {})]
SPECIAL = [0.0, -0.0, 88.0, -88.0, 710.0, -710.0, 1e4, -1e4, numpy.inf, -numpy.inf, numpy.nan]


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


@pytest.fixture(scope="module")
def ops():
    return get_backend("cpu")


def random(shape, dtype, seed=0, scale=3.0):
    return (numpy.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def with_specials(z):
    z = z.copy()
    z.flat[: len(SPECIAL)] = SPECIAL
    return z


def assert_close(actual, ref, atol_eps=4.0):
    """NaN and inf where ``ref`` has them, else |actual - ref| <= rtol |ref| +
    atol_eps * eps (atol_eps may be an array, one bound per element)."""
    actual = numpy.asarray(actual)
    eps = float(numpy.finfo(ref.dtype).eps)
    nan = numpy.isnan(ref)
    assert numpy.array_equal(numpy.isnan(actual), nan), "NaN at other places than in the reference"
    same = nan | (actual == ref)
    with numpy.errstate(invalid="ignore"):
        err = numpy.abs(actual.astype(numpy.float64) - ref)
    bound = RTOL[ref.dtype.type] * numpy.abs(ref.astype(numpy.float64)) + numpy.asarray(atol_eps) * eps
    bad = ~same & ~(err <= bound)
    if bad.any():
        where = tuple(int(i[0]) for i in numpy.nonzero(bad))
        raise AssertionError(f"{bad.sum()} of {bad.size} elements differ; first at {where}: "
                             f"{actual[where]!r} vs reference {ref[where]!r}")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name, params", CASES, ids=[n for n, _ in CASES])
def test_bias_act_and_backward(cp, ops, dtype, name, params):
    act = activations.get(name, **params)
    shape = (4096, 4096) if dtype == numpy.float32 else (1024, 1500)
    z, bias, dy = with_specials(random(shape, dtype)), random(shape[1], dtype, 1), random(shape, dtype, 2)
    with numpy.errstate(all="ignore"):
        z_ref = z + bias
        y_ref = act.forward(ops, z_ref.copy(), numpy.empty_like(z))
        dz_ref = act.backward(ops, dy, y_ref, z_ref, numpy.empty_like(z))

    # The formulas' own cancellation (sigmoid and silu for z << 0, gelu's
    # 1 + erf) costs about eps * |z| absolute, in NumPy as on the GPU.
    spread = 4 * numpy.maximum(1.0, numpy.abs(numpy.where(numpy.isfinite(z_ref), z_ref, 0.0), dtype=numpy.float64))

    z_gpu = cp.asarray(z)
    y_gpu = ck.bias_act(z_gpu, cp.asarray(bias), act.code, act.param, cp.empty_like(z_gpu))
    assert_close(cp.asnumpy(y_gpu), y_ref, spread)
    ck.bias_act(z_gpu, cp.asarray(bias), act.code, act.param, z_gpu)  # in place
    assert_close(cp.asnumpy(z_gpu), y_ref, spread)

    zb = cp.asarray(z_ref)
    y_dev, z_dev = cp.asarray(y_ref), (zb if act.code in ck.GRAD_FROM_Z else None)
    dz = ck.act_backward(cp.asarray(dy), y_dev, z_dev, act.code, act.param, cp.empty_like(zb))
    assert_close(cp.asnumpy(dz), dz_ref, spread * numpy.abs(dy))


def test_bias_act_without_bias(cp, ops):
    z = random((3000, 333), numpy.float32)
    act = activations.get("gelu")
    y = ck.bias_act(cp.asarray(z), None, act.code, act.param, cp.empty(z.shape, numpy.float32))
    assert_close(cp.asnumpy(y), act.forward(ops, z.copy(), numpy.empty_like(z)), 4 * numpy.maximum(1, abs(z)))


@pytest.mark.parametrize("rows, cols", [(20000, 3000), (100, 1), (64, 2000), (10000, 10), (777, 1025)])
def test_fused_bias_grad(cp, ops, rows, cols):
    act = activations.get("elu", alpha=1.0)
    z, dy = random((rows, cols), numpy.float32), random((rows, cols), numpy.float32, 1)
    y = act.forward(ops, z.copy(), numpy.empty_like(z))
    dz_ref = act.backward(ops, dy, y, z, numpy.empty_like(z))
    dy_gpu, y_gpu = cp.asarray(dy), cp.asarray(y)
    dz, db = cp.empty_like(dy_gpu), cp.empty(cols, numpy.float32)
    ck.act_backward(dy_gpu, y_gpu, None, act.code, act.param, dz, db)
    assert_close(cp.asnumpy(dz), dz_ref)
    exact = dz_ref.astype(numpy.float64).sum(axis=0)
    magnitude = numpy.abs(dz_ref).astype(numpy.float64).sum(axis=0)
    assert numpy.all(numpy.abs(cp.asnumpy(db) - exact) <= 1e-5 * magnitude + 1e-6)
    db_again = cp.empty_like(db)
    ck.act_backward(dy_gpu, y_gpu, None, act.code, act.param, dz, db_again)
    assert bool((db == db_again).all()), "the bias gradient is not deterministic"


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows, cols", [(100000, 10), (3000, 1000), (3, 50000)])
def test_softmax_and_backward(cp, ops, dtype, rows, cols):
    z, dy = random((rows, cols), dtype), random((rows, cols), dtype, 1)
    z[0, 0], z[1, :] = 1e4, z[1, :] * 1e3  # one huge logit; a row of large ones
    y_ref = ops.softmax(z, numpy.empty_like(z))
    inner = (dy * y_ref).sum(axis=1, keepdims=True)
    dz_ref = y_ref * (dy - inner)
    z_gpu = cp.asarray(z)
    ck.softmax(z_gpu, z_gpu)  # in place
    assert_close(cp.asnumpy(z_gpu), y_ref)
    dy_gpu = cp.asarray(dy)
    ck.softmax_backward(dy_gpu, cp.asarray(y_ref), dy_gpu)  # in place
    # dy - inner cancels: bound the error by the size of the terms, the sum's
    # by its longest sequential run (each lane adds cols / 32 terms)
    inner_abs = numpy.abs(dy * y_ref).sum(axis=1, keepdims=True)
    assert_close(cp.asnumpy(dy_gpu), dz_ref, 4 * y_ref * (numpy.abs(dy) + (cols / 32 + 8) * inner_abs))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows, cols", [(100000, 10), (300, 5000)])
@pytest.mark.parametrize("label_dtype", [numpy.int64, numpy.int32])
def test_softmax_cross_entropy(cp, ops, dtype, rows, cols, label_dtype):
    logits = random((rows, cols), dtype)
    logits[0] *= 1e3
    labels = numpy.random.default_rng(1).integers(0, cols, rows).astype(label_dtype)
    grad_ref = numpy.empty_like(logits)
    loss_ref = ops.softmax_cross_entropy(logits, labels, grad_ref)
    logits_gpu = cp.asarray(logits)
    loss = ck.softmax_cross_entropy(logits_gpu, cp.asarray(labels), logits_gpu)  # grad in place
    assert loss.shape == () and loss.dtype == dtype
    numpy.testing.assert_allclose(float(loss), float(loss_ref), rtol=RTOL[dtype])
    assert_close(cp.asnumpy(logits_gpu), grad_ref, 4.0 / rows)


def test_cross_entropy_bad_label_is_nan(cp):
    loss = ck.softmax_cross_entropy(cp.zeros((4, 3), numpy.float32), cp.asarray([0, 1, 3, 2]),
                                    cp.empty((4, 3), numpy.float32))
    assert numpy.isnan(float(loss))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("momentum, weight_decay, nesterov", [(0.0, 0.0, False), (0.9, 1e-2, True),
                                                              (0.9, 0.0, False)])
def test_sgd_update(cp, ops, dtype, momentum, weight_decay, nesterov):
    n = 3_000_017
    p = random(n, dtype)
    p_ref, v_ref = p.copy(), numpy.zeros_like(p)
    p_gpu, v_gpu = cp.asarray(p), cp.zeros(n, dtype)
    for step in range(3):
        g = random(n, dtype, seed=10 + step)
        ops.sgd_update(p_ref, g, v_ref, 0.1, momentum, weight_decay, nesterov)
        ck.sgd_update(p_gpu, cp.asarray(g), v_gpu, 0.1, momentum, weight_decay, nesterov)
    assert_close(cp.asnumpy(p_gpu), p_ref)
    assert_close(cp.asnumpy(v_gpu), v_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("weight_decay, decoupled", [(0.0, False), (1e-2, False), (1e-2, True)])
def test_adam_update(cp, ops, dtype, weight_decay, decoupled):
    n = 3_000_017
    p = random(n, dtype)
    p_ref, m_ref, v_ref = p.copy(), numpy.zeros_like(p), numpy.zeros_like(p)
    p_gpu, m_gpu, v_gpu = cp.asarray(p), cp.zeros(n, dtype), cp.zeros(n, dtype)
    for step in range(1, 4):
        g = random(n, dtype, seed=10 + step)
        ops.adam_update(p_ref, g, m_ref, v_ref, 1e-2, 0.9, 0.999, 1e-8, weight_decay, decoupled, step)
        ck.adam_update(p_gpu, cp.asarray(g), m_gpu, v_gpu, 1e-2, 0.9, 0.999, 1e-8, weight_decay, decoupled, step)
    assert_close(cp.asnumpy(p_gpu), p_ref)
    assert_close(cp.asnumpy(m_gpu), m_ref)
    assert_close(cp.asnumpy(v_gpu), v_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_maxout(cp, ops, dtype):
    rng = numpy.random.default_rng(3)
    z3 = rng.integers(-3, 4, size=(4096, 1024, 2)).astype(dtype)  # ties: the first index wins
    z3[0, :5, 1] = numpy.nan
    y_ref, idx_ref = numpy.empty((4096, 1024), dtype), numpy.empty((4096, 1024), numpy.int32)
    ops.maxout_forward(z3, y_ref, idx_ref)
    y, idx = cp.empty((4096, 1024), dtype), cp.empty((4096, 1024), numpy.int32)
    ck.maxout_forward(cp.asarray(z3), y, idx)
    numpy.testing.assert_array_equal(cp.asnumpy(idx), idx_ref)
    numpy.testing.assert_array_equal(cp.asnumpy(y), y_ref)

    dy = random((4096, 1024), dtype, 4)
    dz_ref = numpy.empty_like(z3)
    ops.maxout_backward(dy, idx_ref, dz_ref)
    dz = cp.full(z3.shape, numpy.nan, dtype)
    ck.maxout_backward(cp.asarray(dy), idx, dz)
    numpy.testing.assert_array_equal(cp.asnumpy(dz), dz_ref)
