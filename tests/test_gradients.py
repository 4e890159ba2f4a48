"""Finite-difference gradient checks in float64, on every device.

Each analytic gradient (activations, Dense, Maxout, Dropout, losses, a whole
network) is compared with central differences of a scalar function. Inputs
near a kink (ReLU family at 0, Maxout ties) are resampled away from it, as
Chainer's gradient checks do, so the finite difference is well defined.
"""

import numpy as np
import pytest

import nnaccel as nn
from nnaccel import activations
from nnaccel.backend import get_backend

EPS = 1e-6
RTOL = 1e-5
ATOL = 1e-7
KINK = 1e-3  # inputs closer than this to a kink are resampled

# (name, params, has a kink at 0)
ACTIVATIONS = [
    ("linear", {}, False),
    ("relu", {}, True),
    ("leaky_relu", {}, True),
    ("leaky_relu", {"slope": 0.2}, True),
    ("leaky_relu", {"slope": 0.0}, True),
    ("leaky_relu", {"slope": 2.5}, True),
    ("elu", {}, True),
    ("elu", {"alpha": 0.5}, True),
    ("sigmoid", {}, False),
    ("tanh", {}, False),
    ("softplus", {}, False),
    ("gelu", {}, False),
    ("silu", {}, False),
    ("softmax", {}, False),
]
ACT_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params, _ in ACTIVATIONS]


# ----- helpers -------------------------------------------------------------------------
def away_from_kink(rng, shape, scale=2.0, margin=KINK):
    """Normal samples with every entry at least ``margin`` away from 0."""
    z = rng.standard_normal(shape) * scale
    while True:
        near = np.abs(z) < margin
        if not near.any():
            return z
        z[near] = rng.standard_normal(int(near.sum())) * scale


def numerical_grad(f, x, eps=EPS):
    """Central differences of the scalar ``f`` w.r.t. every entry of the host array ``x``."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        saved = x[index]
        x[index] = saved + eps
        plus = f(x)
        x[index] = saved - eps
        minus = f(x)
        x[index] = saved
        grad[index] = (plus - minus) / (2 * eps)
    return grad


def param_numerical_grads(model, f):
    """Central differences of ``f()`` w.r.t. every parameter, set through ``Parameter.data``."""
    ops = model.backend
    grads = {}
    for p in model.parameters():
        start = ops.to_host(p.data).copy()

        def g(value, p=p):
            p.data = ops.asarray(value)
            return f()

        grads[p.name] = numerical_grad(g, start)
        p.data = ops.asarray(start)
    return grads


def set_params(model, rng, scale=0.5):
    """Random weights and (non-zero) biases, so nothing sits at its initial special value."""
    ops = model.backend
    for p in model.parameters():
        p.data = ops.asarray(rng.standard_normal(p.shape) * scale)


def host(model, array):
    return np.array(model.backend.to_host(array))


def host_of(ops, array):
    return np.array(ops.to_host(array))


def model64(*layers, device, seed=0):
    return nn.Sequential(*layers, device=device, seed=seed, dtype=np.float64)


# ----- activations on their own ----------------------------------------------------------
@pytest.mark.parametrize("name,params,kink", ACTIVATIONS, ids=ACT_IDS)
def test_activation_backward_matches_numerical_derivative(device, name, params, kink):
    """``backward(dy)`` is ``dy * f'(z)`` (softmax: the Jacobian-vector product)."""
    ops = get_backend(device)
    act = activations.get(name, **params)
    rng = np.random.default_rng(1)
    shape = (6, 5)
    z_host = away_from_kink(rng, shape) if kink else rng.standard_normal(shape) * 2.0
    dy_host = rng.standard_normal(shape)

    def f_host(z):
        out = ops.empty(shape, np.float64)
        return ops.to_host(act.forward(ops, ops.asarray(z), out)).copy()

    z = ops.asarray(z_host)
    y = act.forward(ops, z, ops.empty(shape, np.float64))
    dz = host_of(ops, act.backward(ops, ops.asarray(dy_host), y, z, ops.empty(shape, np.float64)))

    if name == "softmax":
        expected = numerical_grad(lambda v: float((f_host(v) * dy_host).sum()), z_host)
    else:  # elementwise: one vectorised central difference gives every derivative
        derivative = (f_host(z_host + EPS) - f_host(z_host - EPS)) / (2 * EPS)
        expected = dy_host * derivative
    np.testing.assert_allclose(dz, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name,params,kink", ACTIVATIONS, ids=ACT_IDS)
def test_activation_in_place_forward_matches_out_of_place(device, name, params, kink):
    """Dense runs uses_output activations with ``out is z``: same values as a separate out."""
    ops = get_backend(device)
    act = activations.get(name, **params)
    z_host = np.random.default_rng(2).standard_normal((4, 7)) * 3.0
    separate = host_of(ops, act.forward(ops, ops.asarray(z_host), ops.empty((4, 7), np.float64)))
    z = ops.asarray(z_host)
    aliased = host_of(ops, act.forward(ops, z, z))
    np.testing.assert_array_equal(aliased, separate)


@pytest.mark.parametrize("name,params,kink", ACTIVATIONS, ids=ACT_IDS)
def test_dense_with_activation_gradients(device, name, params, kink):
    """Dense(5, 4, activation): weight, bias and input gradients vs finite differences."""
    rng = np.random.default_rng(3)
    model = model64(nn.Dense(5, 4, activation=activations.get(name, **params)), device=device)
    ops = model.backend
    set_params(model, rng)
    weight, bias = (host(model, p.data) for p in model.parameters())
    x_host = rng.standard_normal((6, 5))
    if kink:  # resample inputs whose pre-activation lands near the kink
        while True:
            near = np.abs(x_host @ weight + bias).min(axis=1) < KINK
            if not near.any():
                break
            x_host[near] = rng.standard_normal((int(near.sum()), 5))
    r = rng.standard_normal((6, 4))  # the scalar is sum(r * y), so dL/dy = r

    def loss_of_x(x):
        return float((host(model, model.forward(ops.asarray(x))) * r).sum())

    x = ops.asarray(x_host)
    model.forward(x)
    layer = model.layers[0]
    dx = host(model, layer.backward(ops.asarray(r), input_grad=True))
    analytic = {p.name: host(model, p.grad) for p in model.parameters()}

    assert_matches_finite_differences(model, loss_of_x, x_host, analytic, dx)


def assert_matches_finite_differences(model, loss_of_x, x_host, analytic, dx):
    """Every parameter gradient and the input gradient against central differences of the loss."""
    numeric = param_numerical_grads(model, lambda: loss_of_x(x_host))
    for p_name, grad in numeric.items():
        np.testing.assert_allclose(analytic[p_name], grad, rtol=RTOL, atol=ATOL, err_msg=p_name)
    np.testing.assert_allclose(dx, numerical_grad(loss_of_x, x_host), rtol=RTOL, atol=ATOL)


# ----- Maxout -------------------------------------------------------------------------
def test_maxout_forward_matches_reference(device):
    rng = np.random.default_rng(4)
    model = model64(nn.Maxout(5, 4, pieces=3), device=device)
    set_params(model, rng)
    weight, bias = (host(model, p.data) for p in model.parameters())
    assert weight.shape == (5, 4, 3) and bias.shape == (4, 3)
    x = rng.standard_normal((7, 5))
    expected = (np.einsum("ni,iop->nop", x, weight) + bias).max(axis=2)
    got = host(model, model.forward(model.backend.asarray(x)))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pieces", [1, 2, 4])
def test_maxout_gradients(device, pieces):
    rng = np.random.default_rng(5)
    model = model64(nn.Maxout(5, 4, pieces=pieces), device=device)
    ops = model.backend
    set_params(model, rng)
    weight, bias = (host(model, p.data) for p in model.parameters())
    x_host = rng.standard_normal((6, 5))
    if pieces > 1:  # resample rows whose top two pieces are within KINK (ties)
        while True:
            z = np.sort(np.einsum("ni,iop->nop", x_host, weight) + bias, axis=2)
            near = (z[:, :, -1] - z[:, :, -2]).min(axis=1) < KINK
            if not near.any():
                break
            x_host[near] = rng.standard_normal((int(near.sum()), 5))
    r = rng.standard_normal((6, 4))

    def loss_of_x(x):
        return float((host(model, model.forward(ops.asarray(x))) * r).sum())

    model.forward(ops.asarray(x_host))
    dx = host(model, model.layers[0].backward(ops.asarray(r), input_grad=True))
    analytic = {p.name: host(model, p.grad) for p in model.parameters()}
    assert analytic["0.weight"].shape == (5, 4, pieces) and analytic["0.bias"].shape == (4, pieces)

    assert_matches_finite_differences(model, loss_of_x, x_host, analytic, dx)


# ----- Dropout ------------------------------------------------------------------------
def dropout_model(device, rate):
    return model64(nn.Dense(4, 6, activation="tanh"), nn.Dropout(rate), nn.Dense(6, 3), device=device)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_forward_backward_use_the_same_mask(device, rate):
    model = dropout_model(device, rate)
    ops = model.backend
    drop = model.layers[1]
    rng = np.random.default_rng(6)
    x_host = rng.standard_normal((50, 6)) + 3.0  # no zeros: the mask is y / x
    dy_host = rng.standard_normal((50, 6))
    y = host(model, drop.forward(ops.asarray(x_host), training=True))
    mask = y / x_host
    scale = 1.0 / (1.0 - rate)
    kept = np.isclose(mask, scale, rtol=1e-12, atol=0)
    assert np.all(kept | (mask == 0.0)), "mask entries must be 0 or 1/(1-rate)"
    assert 0 < kept.sum() < mask.size
    dx = host(model, drop.backward(ops.asarray(dy_host), input_grad=True))
    np.testing.assert_allclose(dx, dy_host * mask, rtol=1e-12, atol=0)
    # the gradient of sum(r * x * mask) w.r.t. x, by finite differences, is r * mask
    counter = drop.counter

    def f(x):
        drop.counter = counter - 1  # redraw the very same mask
        return float((host(model, drop.forward(ops.asarray(x), training=True)) * dy_host).sum())

    np.testing.assert_allclose(dx[:3], numerical_grad(f, x_host)[:3], rtol=RTOL, atol=ATOL)


def test_dropout_mask_rate_and_device_independence(device):
    """About ``rate`` of the entries are dropped, and every device draws the CPU's mask."""
    model = dropout_model(device, 0.3)
    drop = model.layers[1]
    ones = np.ones((200, 100))
    y = host(model, drop.forward(model.backend.asarray(ones), training=True))
    assert abs((y == 0).mean() - 0.3) < 0.02
    cpu_mask = get_backend("cpu").dropout_mask((200, 100), 0.3, drop.seed, 0, np.float64)
    np.testing.assert_array_equal(y, cpu_mask)


def test_dropout_counter_advances_only_in_training(device):
    model = dropout_model(device, 0.5)
    ops = model.backend
    drop = model.layers[1]
    x = ops.asarray(np.ones((8, 6)))
    assert drop.counter == 0
    first = host(model, drop.forward(x, training=True))
    assert drop.counter == 1
    second = host(model, drop.forward(x, training=True))
    assert drop.counter == 2
    assert not np.array_equal(first, second), "each training forward draws a new mask"
    drop.counter = 0
    np.testing.assert_array_equal(host(model, drop.forward(x, training=True)), first)
    # eval mode: identity, no mask drawn, backward passes dy through
    counter = drop.counter
    out = drop.forward(x, training=False)
    assert drop.counter == counter
    np.testing.assert_array_equal(host(model, out), np.ones((8, 6)))
    dy = np.random.default_rng(7).standard_normal((8, 6))
    np.testing.assert_array_equal(host(model, drop.backward(ops.asarray(dy))), dy)
    # via the model: training forwards advance the counter, eval forwards do not
    x4 = ops.asarray(np.ones((3, 4)))
    model.train()
    before = drop.counter
    model.forward(x4)
    model.forward(x4)
    assert drop.counter == before + 2
    model.eval()
    model.forward(x4)
    assert drop.counter == before + 2


def test_dropout_rate_zero_is_identity_in_training(device):
    model = dropout_model(device, 0.0)
    ops = model.backend
    x = np.random.default_rng(8).standard_normal((5, 6))
    np.testing.assert_array_equal(host(model, model.layers[1].forward(ops.asarray(x), training=True)), x)


# ----- losses -------------------------------------------------------------------------
def loss_case(kind, ops, rng):
    """(loss, y, target on the device, numpy reference of the loss value)."""
    y = rng.standard_normal((5, 4)) * 2.0
    if kind == "softmax_ce":
        labels = np.array([0, 3, 1, 3, 2])
        shifted = y - y.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return nn.SoftmaxCrossEntropy(), y, ops.asarray(labels), -logp[np.arange(5), labels].mean()
    if kind == "softmax_ce_uint8":
        labels = np.array([2, 0, 0, 1, 3], dtype=np.uint8)
        shifted = y - y.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return nn.SoftmaxCrossEntropy(), y, ops.asarray(labels), -logp[np.arange(5), labels].mean()
    if kind == "mse_float":
        target = rng.standard_normal((5, 4))
        return nn.MeanSquaredError(), y, ops.asarray(target), ((y - target) ** 2).mean()
    if kind == "mse_labels":
        labels = np.array([1, 0, 3, 3, 2])
        onehot = np.eye(4)[labels]
        return nn.MeanSquaredError(), y, ops.asarray(labels), ((y - onehot) ** 2).mean()
    if kind == "sigmoid_ce":
        target = rng.uniform(0, 1, (5, 4))
        p = 1 / (1 + np.exp(-y))
        return nn.SigmoidCrossEntropy(), y, ops.asarray(target), \
            -(target * np.log(p) + (1 - target) * np.log(1 - p)).mean()
    if kind == "sigmoid_ce_1d":
        y = y[:, :1].copy()
        target = (rng.uniform(0, 1, 5) > 0.5).astype(np.float64)
        p = 1 / (1 + np.exp(-y[:, 0]))
        return nn.SigmoidCrossEntropy(), y, ops.asarray(target), \
            -(target * np.log(p) + (1 - target) * np.log(1 - p)).mean()
    raise AssertionError(kind)


LOSS_KINDS = ["softmax_ce", "softmax_ce_uint8", "mse_float", "mse_labels", "sigmoid_ce", "sigmoid_ce_1d"]


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_loss_value_and_gradient(device, kind):
    ops = get_backend(device)
    loss, y_host, target, reference = loss_case(kind, ops, np.random.default_rng(9))
    value = loss.forward(ops.asarray(y_host), target)
    assert value.shape == ()
    np.testing.assert_allclose(float(value), reference, rtol=1e-12)
    grad = host_of(ops, loss.backward())  # copy: the next forward reuses the buffer
    assert grad.shape == y_host.shape

    def f(y):
        return float(loss.forward(ops.asarray(y), target))

    np.testing.assert_allclose(grad, numerical_grad(f, y_host), rtol=RTOL, atol=ATOL)


def test_sigmoid_cross_entropy_is_stable_for_large_logits(device):
    ops = get_backend(device)
    y = np.array([[60.0, -60.0, 800.0, -800.0]])
    target = np.array([[0.0, 1.0, 1.0, 0.0]])
    loss = nn.SigmoidCrossEntropy()
    value = float(loss.forward(ops.asarray(y), ops.asarray(target)))
    np.testing.assert_allclose(value, (60.0 + 60.0) / 4, rtol=1e-12)
    grad = host_of(ops, loss.backward())
    np.testing.assert_allclose(grad, np.array([[1.0, -1.0, 0.0, 0.0]]) / 4, atol=1e-15)


def test_softmax_cross_entropy_is_stable_for_large_logits(device):
    ops = get_backend(device)
    y = np.array([[1000.0, 0.0, -1000.0], [0.0, 1000.0, 1000.0]])
    loss = nn.SoftmaxCrossEntropy()
    value = float(loss.forward(ops.asarray(y), ops.asarray(np.array([0, 1]))))
    np.testing.assert_allclose(value, np.log(2) / 2, rtol=1e-12)
    np.testing.assert_allclose(host_of(ops, loss.backward()), [[0, 0, 0], [0, -0.25, 0.25]], atol=1e-15)


# ----- whole networks ----------------------------------------------------------------
NETWORKS = {
    "tanh-gelu-ce": (lambda: [nn.Dense(6, 5, activation="tanh"), nn.Dense(5, 4, activation="gelu"),
                              nn.Dense(4, 3)], "softmax_ce"),
    "sigmoid-silu-mse": (lambda: [nn.Dense(6, 5, activation="sigmoid"), nn.Dense(5, 4, activation="silu"),
                                  nn.Dense(4, 3)], "mse"),
    "softplus-elu-softmax-mse": (lambda: [nn.Dense(6, 5, activation="softplus"),
                                          nn.Dense(5, 4, activation=activations.get("elu", alpha=0.7)),
                                          nn.Dense(4, 3, activation="softmax")], "mse_labels"),
    "maxout-dropout-tanh-sce": (lambda: [nn.Maxout(6, 5, pieces=2), nn.Dropout(0.4),
                                         nn.Dense(5, 4, activation="tanh"), nn.Dense(4, 3)], "sigmoid_ce"),
}


@pytest.mark.parametrize("net", list(NETWORKS))
def test_network_parameter_and_input_gradients(device, net):
    """Every parameter gradient and the input gradient of a multi-layer net vs finite differences."""
    build, loss_kind = NETWORKS[net]
    rng = np.random.default_rng(10)
    model = model64(*build(), device=device, seed=3)
    ops = model.backend
    set_params(model, rng, scale=0.6)
    x_host = rng.standard_normal((4, 6))
    if loss_kind == "softmax_ce":
        loss, target = nn.SoftmaxCrossEntropy(), ops.asarray(np.array([0, 2, 1, 2]))
    elif loss_kind == "mse":
        loss, target = nn.MeanSquaredError(), ops.asarray(rng.standard_normal((4, 3)))
    elif loss_kind == "mse_labels":
        loss, target = nn.MeanSquaredError(), ops.asarray(np.array([2, 0, 1, 1]))
    else:
        loss, target = nn.SigmoidCrossEntropy(), ops.asarray(rng.uniform(0, 1, (4, 3)))
    drops = [layer for layer in model.layers if isinstance(layer, nn.Dropout)]
    model.train(bool(drops))
    counters = [d.counter for d in drops]

    def loss_of_x(x):
        for d, c in zip(drops, counters):  # the same masks every time (counter-based RNG)
            d.counter = c
        return float(loss.forward(model.forward(ops.asarray(x)), target))

    if any(isinstance(layer, nn.Maxout) for layer in model.layers):  # keep away from ties
        maxout = model.layers[0]
        w, b = (host(model, p.data) for p in model.parameters()[:2])
        while True:
            z = np.sort(np.einsum("ni,iop->nop", x_host, w) + b, axis=2)
            near = (z[:, :, -1] - z[:, :, -2]).min(axis=1) < KINK
            if not near.any():
                break
            x_host[near] = rng.standard_normal((int(near.sum()), maxout.in_features))

    loss_of_x(x_host)
    # backward by hand, asking layer 0 for its input gradient too
    dy = loss.backward()
    for layer in reversed(model.layers):
        dy = layer.backward(dy, input_grad=True)
    dx = host(model, dy)
    analytic = {p.name: host(model, p.grad) for p in model.parameters()}
    assert len(analytic) == 2 * sum(layer.in_features is not None for layer in model.layers)

    # model.backward fills the same parameter gradients
    loss_of_x(x_host)
    model.backward(loss.backward())
    for p in model.parameters():
        np.testing.assert_allclose(host(model, p.grad), analytic[p.name], rtol=1e-13, atol=1e-15)

    assert_matches_finite_differences(model, loss_of_x, x_host, analytic, dx)


def test_backward_overwrites_gradients(device):
    """Two backward calls with the same dy leave the same grads (no accumulation)."""
    rng = np.random.default_rng(11)
    model = model64(nn.Dense(4, 5, activation="relu"), nn.Dense(5, 2), device=device)
    ops = model.backend
    x = ops.asarray(rng.standard_normal((3, 4)))
    dy = ops.asarray(rng.standard_normal((3, 2)))
    model.forward(x)
    model.backward(dy)
    once = host(model, model.flat_grads)
    model.backward(dy)
    np.testing.assert_array_equal(host(model, model.flat_grads), once)
    for p in model.parameters():  # each p.grad is its slice of the flat buffer
        assert p.grad.shape == p.shape


def test_gradients_unaffected_by_reused_buffers_of_other_batch_sizes(device):
    """Work buffers are reused as leading-row views: a smaller batch after a larger one (and back)
    gives the gradients of a fresh model."""
    rng = np.random.default_rng(12)

    def build():
        return model64(nn.Maxout(5, 4, pieces=2), nn.Dense(4, 6, activation="gelu"), nn.Dropout(0.0),
                       nn.Dense(6, 3, activation="elu"), device=device, seed=5)

    x_small, labels = rng.standard_normal((3, 5)), np.array([0, 2, 1])
    x_large = rng.standard_normal((9, 5))
    fresh, reused = build(), build()
    loss = nn.SoftmaxCrossEntropy()
    ops = fresh.backend

    def grads(model, x, y):
        loss.forward(model.forward(ops.asarray(x)), ops.asarray(y))
        model.backward(loss.backward())
        return host(model, model.flat_grads).copy()

    expected = grads(fresh, x_small, labels)
    grads(reused, x_large, rng.integers(0, 3, 9))
    np.testing.assert_allclose(grads(reused, x_small, labels), expected, rtol=1e-12, atol=1e-14)
    grads(reused, np.concatenate([x_large, x_large]), rng.integers(0, 3, 18))
    np.testing.assert_allclose(grads(reused, x_small, labels), expected, rtol=1e-12, atol=1e-14)
