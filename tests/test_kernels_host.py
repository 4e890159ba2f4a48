"""The kernels' math, run on the host, against nnaccel's NumPy reference.

tests/kernel_host_shim.cpp loops over arrays with the same per-element
functions the CUDA kernels call (activations, cross-entropy, maxout argmax,
optimizer steps); it is built with g++ without -ffast-math, so NaN and inf
behave as on the GPU. The GPU's libm differs from glibc and NumPy by a few
ulps; the GPU tests check that part.
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy
import pytest

from nnaccel import activations
from nnaccel.backend import Backend, cuda_kernels, get_backend

HERE = Path(__file__).resolve().parent
DTYPES = (numpy.float32, numpy.float64)
SUFFIX = {numpy.float32: "f32", numpy.float64: "f64"}
P, I32, I64, F64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_double
SIGNATURES = {
    "act_forward": (I32, F64, P, P, I64),
    "act_backward": (I32, F64, P, P, P, I64),
    "cross_entropy": (P, P, P, P, I64, I64, F64),
    "maxout_forward": (P, P, P, I64, I32),
    "sgd_update": (P, P, P, I64, F64, F64, F64, I32),
    "adam_update": (P, P, P, P, I64, F64, F64, F64, F64, F64, I32, F64, F64),
}

# (name, params) of the activations under test: every code, and the params
# that take each branch (leaky_relu with slope 0, < 1 and > 1).
CASES = [("linear", {}), ("relu", {}), ("leaky_relu", {"slope": 0.0}), ("leaky_relu", {"slope": 0.01}),
         ("leaky_relu", {"slope": 2.0}), ("elu", {"alpha": 1.0}), ("elu", {"alpha": 0.3}), ("sigmoid", {}),
         ("tanh", {}), ("softplus", {}), ("gelu", {}), ("silu", {})]

# Documented bound: |kernel - ref| <= ULPS * eps * |ref| + ABS * eps * max(1, |z|)
# (times |dy| for the derivative), eps the dtype's machine epsilon. Measured
# on x86-64 (glibc vs NumPy/SciPy): <= 3 ulps relative everywhere the result
# is well-conditioned. The absolute term covers the formulas' own
# cancellation, shared by NumPy and the kernels: sigmoid = 0.5 tanh(z/2) + 0.5
# loses everything below eps/2 for z << 0 (NumPy's float32 tanh gives 3e-8 at
# z = -19.6 where glibc gives 0), silu and gelu scale that by |z|, and
# gelu's 1 + erf(z/sqrt 2) cancels for z < 0 (400 ulps relative at z = -3.2,
# yet 1e-7 absolute).
ULPS, ABS = 4, 2


@pytest.fixture(scope="session")
def shim(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++ or c++) on PATH")
    library = tmp_path_factory.mktemp("shim") / "kernel_host_shim.so"
    result = subprocess.run(
        [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
         "-I", str(cuda_kernels.kernels_dir()), str(HERE / "kernel_host_shim.cpp"), "-o", str(library)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(library))
    for name, argtypes in SIGNATURES.items():
        for suffix in SUFFIX.values():
            getattr(lib, f"{name}_{suffix}").argtypes = argtypes
    return lib


def call(lib, name, dtype, *args):
    """Call ``name_<dtype>`` with arrays passed as pointers."""
    converted = [a.ctypes.data_as(P) if isinstance(a, numpy.ndarray) else a for a in args]
    getattr(lib, f"{name}_{SUFFIX[dtype]}")(*converted)


@pytest.fixture(scope="module")
def ops():
    return get_backend("cpu")


def inputs(dtype, seed=0):
    """Random z of several scales plus the special values: zeros of both
    signs, the exp/expm1 overflow edges (88, 710), huge values, infinities,
    NaN and subnormals."""
    rng = numpy.random.default_rng(seed)
    info = numpy.finfo(dtype)
    special = [0.0, -0.0, 1e-30, -1e-30, info.smallest_subnormal, -info.smallest_subnormal, 0.5, -0.5,
               1.0, -1.0, 20.0, -20.0, 88.0, -88.0, 89.0, -89.0, 709.0, -709.0, 710.0, -710.0, 1e4, -1e4,
               float(info.max), float(-info.max), numpy.inf, -numpy.inf, numpy.nan]
    with numpy.errstate(over="ignore"):  # 709 and 710 overflow float32 to inf: fine
        return numpy.concatenate([rng.standard_normal(4000) * 3, rng.standard_normal(2000) * 30,
                                  special]).astype(dtype)


def assert_close(kernel, ref, z, scale, what):
    """NaNs and infinities where the reference has them, the rest within the
    documented bound; returns the largest difference, absolute and as a
    fraction of the bound."""
    nan_k, nan_r = numpy.isnan(kernel), numpy.isnan(ref)
    assert numpy.array_equal(nan_k, nan_r), f"{what}: NaN differs at z = {z[nan_k != nan_r]}"
    inf = numpy.isinf(kernel) | numpy.isinf(ref)
    assert numpy.array_equal(kernel[inf], ref[inf]), f"{what}: infinities differ at z = {z[inf & (kernel != ref)]}"
    finite = ~(nan_r | inf)
    eps = float(numpy.finfo(kernel.dtype).eps)
    k, r = kernel[finite].astype(numpy.float64), ref[finite].astype(numpy.float64)
    bound = ULPS * eps * numpy.abs(r) + ABS * eps * numpy.maximum(1.0, numpy.abs(z[finite])) * scale[finite]
    excess = numpy.abs(k - r) / numpy.where(bound > 0, bound, numpy.inf)
    exact = k == r
    worst = int(numpy.argmax(numpy.where(exact, 0.0, excess)))
    assert numpy.all(exact | (excess <= 1.0)), (
        f"{what}: z = {z[finite][worst]!r}: kernel {k[worst]!r}, reference {r[worst]!r}, "
        f"{excess[worst]:.3g} x the bound")
    return float(numpy.max(numpy.abs(k - r), initial=0.0)), float(numpy.max(excess, initial=0.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("name, params", CASES, ids=[f"{n}{p or ''}" for n, p in CASES])
def test_activation_matches_numpy(shim, ops, dtype, name, params):
    act = activations.get(name, **params)
    assert cuda_kernels.ACT_CODES[name] == act.code
    z = inputs(dtype)
    dy = numpy.random.default_rng(1).standard_normal(z.size).astype(dtype)
    with numpy.errstate(all="ignore"):
        y_ref = act.forward(ops, z.copy(), numpy.empty_like(z))
        dz_ref = act.backward(ops, dy, y_ref, z, numpy.empty_like(z))
    y = numpy.empty_like(z)
    call(shim, "act_forward", dtype, act.code, act.param, z, y, z.size)
    dz = numpy.empty_like(z)
    call(shim, "act_backward", dtype, act.code, act.param, dy, y_ref if act.uses_output else z, dz, z.size)

    forward = assert_close(y, y_ref, z, numpy.ones_like(z), f"{name} forward")
    derivative = assert_close(dz, dz_ref, z, numpy.abs(dy), f"{name} derivative")
    print(f"{name}{params or ''} {numpy.dtype(dtype).name}: max |kernel - numpy| (fraction of the bound): "
          f"forward {forward[0]:.3g} ({forward[1]:.2f}), derivative {derivative[0]:.3g} ({derivative[1]:.2f})")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_cross_entropy_matches_numpy(shim, ops, dtype):
    rng = numpy.random.default_rng(2)
    logits = (rng.standard_normal((64, 37)) * 5).astype(dtype)
    logits[1] *= 1e4  # one dominant logit: exp underflows everywhere else
    logits[2, 3] = -numpy.inf  # a class that can never be picked...
    labels = rng.integers(0, 37, size=64)
    labels[2] = 3  # ...labelled: infinite loss
    logits[3, 5] = numpy.nan  # a NaN poisons its row
    grad_ref = numpy.empty_like(logits)
    with numpy.errstate(all="ignore"):
        loss_ref = ops.softmax_cross_entropy(logits, labels, grad_ref)
    grad, row_loss = numpy.empty_like(logits), numpy.empty(64, dtype)
    call(shim, "cross_entropy", dtype, logits, labels.astype(numpy.int64), grad, row_loss, 64, 37, 1.0 / 64)
    assert numpy.isposinf(row_loss[2]) and numpy.isnan(row_loss[3])
    finite = numpy.isfinite(row_loss)
    with numpy.errstate(all="ignore"):
        finite_ref = ops.softmax_cross_entropy(logits[finite], labels[finite], numpy.empty_like(logits[finite]))
    rtol = 8 * numpy.finfo(dtype).eps
    numpy.testing.assert_allclose(row_loss[finite].mean(), finite_ref, rtol=rtol)
    assert numpy.isnan(loss_ref) and numpy.isnan(row_loss.mean())
    numpy.testing.assert_allclose(grad, grad_ref, rtol=rtol, atol=rtol / 64, equal_nan=True)


def test_cross_entropy_bad_label_gives_nan(shim):
    logits = numpy.zeros((2, 3))
    grad, row_loss = numpy.empty_like(logits), numpy.empty(2)
    call(shim, "cross_entropy", numpy.float64, logits, numpy.array([-1, 3]), grad, row_loss, 2, 3, 0.5)
    assert numpy.isnan(row_loss).all() and numpy.isnan(grad).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_maxout_argmax_matches_numpy(shim, ops, dtype):
    rng = numpy.random.default_rng(3)
    z3 = rng.integers(-2, 3, size=(50, 7, 4)).astype(dtype)  # many ties: the first index wins
    z3[0, 0, 2] = z3[1, 1, 0] = z3[1, 1, 3] = numpy.nan  # NaN wins, the first one
    z3[2, 2, :] = -numpy.inf
    y_ref, idx_ref = numpy.empty((50, 7), dtype), numpy.empty((50, 7), numpy.int32)
    ops.maxout_forward(z3, y_ref, idx_ref)
    y, idx = numpy.empty_like(y_ref), numpy.empty_like(idx_ref)
    call(shim, "maxout_forward", dtype, z3, y, idx, 350, 4)
    numpy.testing.assert_array_equal(idx, idx_ref)
    numpy.testing.assert_array_equal(y, y_ref)


OPTIMIZER_CASES = [  # (momentum, weight_decay, nesterov)
    (0.0, 0.0, False), (0.9, 0.0, False), (0.9, 1e-2, False), (0.9, 1e-2, True), (0.0, 1e-2, False)]


def optimizer_state(dtype, seed=4, n=1000):
    rng = numpy.random.default_rng(seed)
    p = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(5)]
    return p, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("momentum, weight_decay, nesterov", OPTIMIZER_CASES)
def test_sgd_matches_numpy(shim, ops, dtype, momentum, weight_decay, nesterov):
    p, grads = optimizer_state(dtype)
    p_ref, v_ref, v = p.copy(), numpy.zeros_like(p), numpy.zeros_like(p)
    for g in grads:  # the generic formula (PyTorch's order of operations), which the kernel follows
        Backend.sgd_update(ops, p_ref, g, v_ref, 0.1, momentum, weight_decay, nesterov)
        call(shim, "sgd_update", dtype, p, g, v, p.size, 0.1, momentum, weight_decay, int(nesterov))
    rtol = 2 * numpy.finfo(dtype).eps
    numpy.testing.assert_allclose(p, p_ref, rtol=rtol, atol=rtol)
    numpy.testing.assert_allclose(v, v_ref, rtol=rtol, atol=rtol)


ADAM_CASES = [(0.0, False), (1e-2, False), (1e-2, True)]  # (weight_decay, decoupled)


def run_adam(shim, dtype, p, grads, weight_decay, decoupled, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
    m, v = numpy.zeros_like(p), numpy.zeros_like(p)
    for step, g in enumerate(grads, start=1):
        bc1, bc2 = 1.0 - betas[0] ** step, 1.0 - betas[1] ** step
        call(shim, "adam_update", dtype, p, g, m, v, p.size, lr, *betas, eps, weight_decay, int(decoupled), bc1, bc2)
    return p


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
@pytest.mark.parametrize("weight_decay, decoupled", ADAM_CASES)
def test_adam_matches_numpy(shim, ops, dtype, weight_decay, decoupled):
    p, grads = optimizer_state(dtype)
    p_ref, m_ref, v_ref = p.copy(), numpy.zeros_like(p), numpy.zeros_like(p)
    for step, g in enumerate(grads, start=1):
        ops.adam_update(p_ref, g, m_ref, v_ref, 1e-2, 0.9, 0.999, 1e-8, weight_decay, decoupled, step)
    run_adam(shim, dtype, p, grads, weight_decay, decoupled)
    rtol = 4 * numpy.finfo(dtype).eps
    numpy.testing.assert_allclose(p, p_ref, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("momentum, weight_decay, nesterov", OPTIMIZER_CASES)
def test_sgd_matches_torch(shim, momentum, weight_decay, nesterov):
    torch = pytest.importorskip("torch")
    p, grads = optimizer_state(numpy.float64)
    param = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt = torch.optim.SGD([param], lr=0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    v = numpy.zeros_like(p)
    for g in grads:
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        call(shim, "sgd_update", numpy.float64, p, g, v, p.size, 0.1, momentum, weight_decay, int(nesterov))
    numpy.testing.assert_allclose(p, param.detach().numpy(), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("weight_decay, decoupled", ADAM_CASES)
def test_adam_matches_torch(shim, weight_decay, decoupled):
    torch = pytest.importorskip("torch")
    p, grads = optimizer_state(numpy.float64)
    param = torch.nn.Parameter(torch.from_numpy(p.copy()))
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = kind([param], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    for g in grads:
        param.grad = torch.from_numpy(g.copy())
        opt.step()
    run_adam(shim, numpy.float64, p, grads, weight_decay, decoupled)
    # torch updates m with lerp, a different rounding of the same formula
    numpy.testing.assert_allclose(p, param.detach().numpy(), rtol=1e-12, atol=1e-13)
