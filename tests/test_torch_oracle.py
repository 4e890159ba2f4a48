"""PyTorch as an oracle: same weights, same data, same numbers.

Forward outputs, loss values and every parameter gradient of multi-layer
nets; optimizer trajectories against torch.optim; LR schedules against
torch.optim.lr_scheduler; Maxout against a torch reimplementation.
"""

import numpy as np
import pytest

import nnaccel as nn
from nnaccel import activations

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = {np.float32: {"rtol": 1e-5, "atol": 1e-6}, np.float64: {"rtol": 1e-11, "atol": 1e-13}}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
DTYPE_IDS = ["float32", "float64"]

# nnaccel activation (name, params) -> the torch function
TORCH_ACT = {
    "linear": lambda p: (lambda t: t),
    "relu": lambda p: F.relu,
    "leaky_relu": lambda p: (lambda t: F.leaky_relu(t, negative_slope=p.get("slope", 0.01))),
    "elu": lambda p: (lambda t: F.elu(t, alpha=p.get("alpha", 1.0))),
    "sigmoid": lambda p: torch.sigmoid,
    "tanh": lambda p: torch.tanh,
    "softplus": lambda p: F.softplus,
    "gelu": lambda p: F.gelu,  # exact (erf) by default
    "silu": lambda p: F.silu,
    "softmax": lambda p: (lambda t: torch.softmax(t, dim=1)),
}
HIDDEN = [
    ("relu", {}), ("tanh", {}), ("gelu", {}), ("silu", {}), ("elu", {}), ("elu", {"alpha": 0.5}),
    ("leaky_relu", {}), ("leaky_relu", {"slope": 0.2}), ("softplus", {}), ("sigmoid", {}), ("linear", {}),
]
HIDDEN_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in HIDDEN]
SIZES = (20, 32, 16, 10)
BATCH = 24


# ----- helpers -------------------------------------------------------------------------
def build_pair(acts, dtype, device, seed=0):
    """An nnaccel Dense net and a torch function computing the same thing with copied weights."""
    layers = [nn.Dense(SIZES[i], SIZES[i + 1], activation=activations.get(name, **params))
              for i, (name, params) in enumerate(acts)]
    model = nn.Sequential(*layers, device=device, seed=seed, dtype=dtype)
    ops = model.backend
    rng = np.random.default_rng(seed + 100)
    for p in model.parameters():  # non-zero biases too
        if p.name.endswith("bias"):
            p.data = ops.asarray((rng.standard_normal(p.shape) * 0.1).astype(dtype))
    linears = []
    for layer in model.layers:
        linear = torch.nn.Linear(layer.in_features, layer.out_features, dtype=TORCH_DTYPE[dtype])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.array(ops.to_host(layer.params["weight"].data)).T))
            linear.bias.copy_(torch.from_numpy(np.array(ops.to_host(layer.params["bias"].data))))
        linears.append(linear)
    torch_acts = [TORCH_ACT[name](params) for name, params in acts]

    def torch_forward(x):
        for linear, act in zip(linears, torch_acts):
            x = act(linear(x))
        return x

    return model, linears, torch_forward


def torch_params(linears):
    """The torch tensors matching ``model.parameters()`` order (weight, bias per layer)."""
    out = []
    for linear in linears:
        out += [linear.weight, linear.bias]
    return out


def as_nnaccel_layout(tensor, name):
    """A torch parameter (or its grad) in nnaccel's layout: Linear weights are (out, in)."""
    array = tensor.detach().numpy()
    return array.T if name.endswith("weight") else array


def make_targets(loss_kind, dtype, rng, batch=BATCH, classes=SIZES[-1]):
    """(nnaccel loss, target host array, torch loss function of (output, target tensor), target tensor)."""
    if loss_kind == "softmax_ce":
        labels = rng.integers(0, classes, batch)
        return nn.SoftmaxCrossEntropy(), labels, F.cross_entropy, torch.from_numpy(labels)
    if loss_kind == "mse":
        target = rng.standard_normal((batch, classes)).astype(dtype)
        return nn.MeanSquaredError(), target, F.mse_loss, torch.from_numpy(target)
    if loss_kind == "mse_labels":
        labels = rng.integers(0, classes, batch)
        onehot = F.one_hot(torch.from_numpy(labels), classes).to(TORCH_DTYPE[dtype])
        return nn.MeanSquaredError(), labels, F.mse_loss, onehot
    if loss_kind == "sigmoid_ce":
        target = rng.uniform(0, 1, (batch, classes)).astype(dtype)
        return nn.SigmoidCrossEntropy(), target, F.binary_cross_entropy_with_logits, torch.from_numpy(target)
    raise AssertionError(loss_kind)


def compare_forward_backward(model, linears, torch_forward, loss_kind, dtype, seed=1):
    ops = model.backend
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, SIZES[0])).astype(dtype)
    loss, target, torch_loss, torch_target = make_targets(loss_kind, dtype, rng)
    tol = TOL[dtype]

    out = model.forward(ops.asarray(x))
    value = loss.forward(out, ops.asarray(target))
    model.backward(loss.backward())

    t_out = torch_forward(torch.from_numpy(x))
    t_value = torch_loss(t_out, torch_target)
    t_value.backward()

    np.testing.assert_allclose(ops.to_host(out), t_out.detach().numpy(), **tol, err_msg="forward")
    assert value.dtype == dtype
    np.testing.assert_allclose(float(value), t_value.item(), **tol, err_msg="loss")
    for p, t in zip(model.parameters(), torch_params(linears), strict=True):
        assert ops.to_host(p.grad).dtype == dtype
        np.testing.assert_allclose(ops.to_host(p.grad), as_nnaccel_layout(t.grad, p.name), **tol,
                                   err_msg=f"grad of {p.name}")


# ----- forward, loss and gradients ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("loss_kind", ["softmax_ce", "mse", "mse_labels", "sigmoid_ce"])
@pytest.mark.parametrize("hidden", HIDDEN, ids=HIDDEN_IDS)
def test_net_matches_torch(device, hidden, loss_kind, dtype):
    acts = [hidden, hidden, ("linear", {})]
    model, linears, torch_forward = build_pair(acts, dtype, device)
    compare_forward_backward(model, linears, torch_forward, loss_kind, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("acts", [
    [("relu", {}), ("tanh", {}), ("linear", {})],
    [("gelu", {}), ("silu", {}), ("softmax", {})],
    [("elu", {"alpha": 2.0}), ("leaky_relu", {"slope": 0.05}), ("sigmoid", {})],
    [("softplus", {}), ("relu", {}), ("tanh", {})],
], ids=["relu-tanh-linear", "gelu-silu-softmax", "elu-leaky-sigmoid", "softplus-relu-tanh"])
@pytest.mark.parametrize("loss_kind", ["softmax_ce", "mse"])
def test_mixed_activation_net_matches_torch(device, acts, loss_kind, dtype):
    model, linears, torch_forward = build_pair(acts, dtype, device, seed=4)
    compare_forward_backward(model, linears, torch_forward, loss_kind, dtype, seed=5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["sigmoid", "silu", "sigmoid_cross_entropy"])
def test_sigmoid_tails_match_torch(device, name, dtype):
    """Far below zero sigmoid(z) ~ e^z is tiny, not 0: sigmoid and silu (a Dense layer's forward and
    derivative: its bias gradient for one sample), and sigmoid cross-entropy's gradient, within 8 ulps of
    PyTorch's down to where e^z leaves the normal range (the derivatives: of their terms' size)."""
    low = -80.0 if dtype == np.float32 else -700.0
    z = np.concatenate([np.linspace(low, 30.0, 1001), [-17.5, -20.0, -30.0]]).astype(dtype)
    t = torch.from_numpy(z.copy()).requires_grad_()
    if name == "sigmoid_cross_entropy":
        loss = nn.SigmoidCrossEntropy()
        ops = nn.Sequential(nn.Dense(1, 1), device=device).backend
        loss.forward(ops.asarray(z[None]), ops.asarray(np.zeros((1, z.size), dtype)))
        values = [ops.to_host(loss.backward())[0]]
        F.binary_cross_entropy_with_logits(t[None], torch.zeros((1, z.size), dtype=t.dtype)).backward()
        references = [t.grad.numpy()]
    else:
        model = nn.Sequential(nn.Dense(1, z.size, activation=name), device=device, dtype=dtype)
        ops = model.backend
        model.layers[0].params["weight"].data = ops.asarray(z[None])  # z = 1 * weight + 0
        model.layers[0].params["bias"].data = ops.zeros(z.size, dtype)
        y = model.forward(ops.asarray(np.ones((1, 1), dtype)))
        model.backward(ops.asarray(np.ones((1, z.size), dtype)))
        values = [ops.to_host(y)[0], ops.to_host(model.layers[0].params["bias"].grad)]
        forward = TORCH_ACT[name]({})(t)
        forward.sum().backward()
        references = [forward.detach().numpy(), t.grad.numpy()]
    eps, s = np.finfo(dtype).eps, torch.sigmoid(t).detach().numpy()
    sizes = [np.zeros_like(z), s * (1 + np.abs(z)) if name == "silu" else s]  # y (1 - y) cancels for z >> 0
    for value, reference, size, what in zip(values, references, sizes, ["value", "derivative"]):
        assert value.dtype == dtype
        bad = ~(np.abs(value - reference) <= 8 * eps * np.maximum(np.abs(reference), size))
        assert not bad.any(), f"{name} {what} at z = {z[bad][:3]}: {value[bad][:3]} against {reference[bad][:3]}"


# ----- Maxout -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("pieces", [2, 3])
def test_maxout_matches_torch(device, pieces, dtype):
    model = nn.Sequential(nn.Maxout(20, 16, pieces=pieces), nn.Dense(16, 10), device=device, seed=2,
                          dtype=dtype)
    ops = model.backend
    rng = np.random.default_rng(6)
    model.parameters()[1].data = ops.asarray((rng.standard_normal((16, pieces)) * 0.1).astype(dtype))
    w1, b1, w2, b2 = (torch.from_numpy(np.array(ops.to_host(p.data))).requires_grad_()
                      for p in model.parameters())
    x = rng.standard_normal((BATCH, 20)).astype(dtype)
    labels = rng.integers(0, 10, BATCH)

    out = model.forward(ops.asarray(x))
    loss = nn.SoftmaxCrossEntropy()
    value = loss.forward(out, ops.asarray(labels))
    model.backward(loss.backward())

    tx = torch.from_numpy(x)
    z = tx @ w1.reshape(20, 16 * pieces) + b1.reshape(16 * pieces)
    h = z.view(BATCH, 16, pieces).max(dim=-1).values
    t_out = h @ w2 + b2
    t_value = F.cross_entropy(t_out, torch.from_numpy(labels))
    t_value.backward()

    tol = TOL[dtype]
    np.testing.assert_allclose(ops.to_host(out), t_out.detach().numpy(), **tol)
    np.testing.assert_allclose(float(value), t_value.item(), **tol)
    for p, t in zip(model.parameters(), (w1, b1, w2, b2)):
        np.testing.assert_allclose(ops.to_host(p.grad), t.grad.numpy(), **tol, err_msg=p.name)


# ----- optimizer trajectories ------------------------------------------------------------
OPTIMIZERS = {
    "sgd": (lambda: nn.SGD(lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "sgd-momentum": (lambda: nn.SGD(lr=0.1, momentum=0.9),
                     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "sgd-nesterov": (lambda: nn.SGD(lr=0.1, momentum=0.9, nesterov=True),
                     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)),
    "sgd-weight-decay": (lambda: nn.SGD(lr=0.1, weight_decay=1e-2),
                         lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=1e-2)),
    "sgd-momentum-weight-decay": (lambda: nn.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
                                  lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                                             weight_decay=1e-2)),
    "adam": (lambda: nn.Adam(lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    "adam-weight-decay": (lambda: nn.Adam(lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=1e-2),
                          lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.99), eps=1e-7,
                                                      weight_decay=1e-2)),
    "adamw": (lambda: nn.AdamW(lr=1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
    "adamw-weight-decay": (lambda: nn.AdamW(lr=1e-2, weight_decay=0.1),
                           lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
}
TRAJECTORY_TOL = {np.dtype(np.float32): {"rtol": 1e-5, "atol": 1e-6},
                  np.dtype(np.float64): {"rtol": 1e-10, "atol": 1e-12}}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_trajectory_matches_torch(device, name, dtype):
    make_ours, make_torch = OPTIMIZERS[name]
    acts = [("tanh", {}), ("gelu", {}), ("linear", {})]
    model, linears, torch_forward = build_pair(acts, dtype, device, seed=7)
    ours, theirs = make_ours(), make_torch(torch_params(linears))
    rng = np.random.default_rng(8)
    for step in range(5):
        _step_both_and_compare(model, ours, torch_forward, theirs, rng, f"after step {step + 1}")
    assert ours.steps == 5


def _step_both_and_compare(model, ours, torch_forward, theirs, rng, when):
    """One step of softmax cross-entropy on a batch drawn from ``rng`` by nnaccel's optimizer ``ours``
    and PyTorch's ``theirs`` (on ``torch_forward``'s weights); then the weights must agree."""
    ops, dtype = model.backend, model.dtype
    loss, t_params = nn.SoftmaxCrossEntropy(), theirs.param_groups[0]["params"]
    x = rng.standard_normal((BATCH, SIZES[0])).astype(dtype)
    labels = rng.integers(0, SIZES[-1], BATCH)
    loss.forward(model.forward(ops.asarray(x)), ops.asarray(labels))
    model.backward(loss.backward())
    ours.step(model)
    theirs.zero_grad()
    F.cross_entropy(torch_forward(torch.from_numpy(x)), torch.from_numpy(labels)).backward()
    theirs.step()
    for p, t in zip(model.parameters(), t_params, strict=True):
        np.testing.assert_allclose(ops.to_host(p.data), as_nnaccel_layout(t, p.name), **TRAJECTORY_TOL[dtype],
                                   err_msg=f"{p.name} {when}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
def test_sgd_momentum_changed_between_steps_follows_torch(device, dtype):
    """A momentum turned on after plain steps (a warm-up callback), then off, then on again: PyTorch makes
    the velocity at its first momentum step and keeps it, unused, while the momentum is 0, in its state_dict
    too (a checkpoint of SGD at momentum 0 left it out)."""
    model, linears, torch_forward = build_pair([("tanh", {}), ("relu", {}), ("linear", {})], dtype, device, seed=3)
    ours, theirs = nn.SGD(lr=0.1), torch.optim.SGD(torch_params(linears), lr=0.1)
    rng = np.random.default_rng(4)
    for step, momentum in enumerate([0.0, 0.0, 0.9, 0.9, 0.0, 0.5, 0.5]):
        ours.momentum = theirs.param_groups[0]["momentum"] = momentum
        _step_both_and_compare(model, ours, torch_forward, theirs, rng, f"after step {step + 1} (momentum {momentum})")
        kept = {"momentum_buffer" in state for state in theirs.state_dict()["state"].values()} or {False}
        assert kept == {"velocity" in ours.state_dict()["buffers"]}, f"after step {step + 1}"


# ----- learning-rate schedules -------------------------------------------------------------
def torch_lrs(make_scheduler, base_lr, epochs):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("step_size,gamma", [(1, 0.9), (3, 0.5), (7, 0.1), (25, 0.5)])
def test_step_lr_matches_torch(step_size, gamma):
    ours = nn.StepLR(step_size, gamma)
    expected = torch_lrs(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size, gamma), 0.1, 20)
    np.testing.assert_allclose([ours.lr_at(e, 0.1) for e in range(20)], expected, rtol=1e-12)


@pytest.mark.parametrize("t_max,eta_min,epochs", [(20, 0.0, 21), (20, 1e-3, 21), (30, 1e-4, 20), (7, 0.0, 8)])
def test_cosine_annealing_matches_torch(t_max, eta_min, epochs):
    """Equal up to and including ``t_max`` (beyond it torch's curve rises again, ours holds)."""
    ours = nn.CosineAnnealing(t_max, eta_min)
    expected = torch_lrs(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, t_max, eta_min),
                         0.1, epochs)
    np.testing.assert_allclose([ours.lr_at(e, 0.1) for e in range(epochs)], expected, rtol=1e-12, atol=1e-15)


def test_cosine_annealing_holds_eta_min_after_t_max():
    ours = nn.CosineAnnealing(5, 0.01)
    assert [ours.lr_at(e, 0.1) for e in range(5, 20)] == [pytest.approx(0.01)] * 15


def test_schedule_drives_trainer_lr_like_torch(device):
    """Trainer sets ``optimizer.lr = schedule.lr_at(epoch, base_lr)`` at each epoch start."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((16, 4)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    model = nn.Sequential(nn.Dense(4, 3), device=device)
    trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.1), batch_size=8, schedule=nn.StepLR(2, 0.5),
                         quiet=True)
    history = trainer.fit(x, y, epochs=6)
    expected = torch_lrs(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, 0.5), 0.1, 6)
    np.testing.assert_allclose(history["lr"], expected, rtol=1e-12)
