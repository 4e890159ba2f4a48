"""float32 in, float32 throughout; float64 models stay float64.

NumPy 2 promotion rules (NEP 50) make a float64 array or NumPy scalar
silently upcast a float32 computation; these tests check every array a
model, loss, optimizer and trainer hands out (and the work buffers they
keep) has the model's dtype.
"""

import numpy as np
import pytest

import nnaccel as nn
from nnaccel import activations
from nnaccel.backend import get_backend
from tolerances import assert_within, difference_bound

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["float32", "float64"]
ACTIVATION_NAMES = list(activations.ACTIVATIONS)
OPTIMIZERS = {
    "sgd": lambda: nn.SGD(lr=0.05),
    "sgd-momentum": lambda: nn.SGD(lr=0.05, momentum=0.9),
    "sgd-nesterov-wd": lambda: nn.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda: nn.Adam(lr=1e-3),
    "adam-wd": lambda: nn.Adam(lr=1e-3, weight_decay=1e-2),
    "adamw": lambda: nn.AdamW(lr=1e-3),
}


def make_model(device, dtype, activation="relu", dropout=True, maxout=True):
    layers = [nn.Maxout(6, 8, pieces=2)] if maxout else [nn.Dense(6, 8, activation="tanh")]
    if dropout:
        layers.append(nn.Dropout(0.25))
    layers += [nn.Dense(8, 5, activation=activation), nn.Dense(5, 3)]
    return nn.Sequential(*layers, device=device, seed=1, dtype=dtype)


def host(model, array):
    return np.asarray(model.backend.to_host(array))


def assert_dtype(array, dtype, what):
    assert array.dtype == np.dtype(dtype), f"{what} has dtype {array.dtype}, expected {np.dtype(dtype)}"


def assert_model_dtype(model, dtype):
    """Parameters, gradients, flat buffers and every kept work array have ``dtype``."""
    assert model.dtype == np.dtype(dtype)
    assert_dtype(model.flat_params, dtype, "flat_params")
    assert_dtype(model.flat_grads, dtype, "flat_grads")
    for p in model.parameters():
        assert_dtype(p.data, dtype, f"{p.name}.data")
        assert_dtype(p.grad, dtype, f"{p.name}.grad")
    for index, layer in enumerate(model.layers):
        for key, buf in layer._work.items():
            expected = np.int32 if key == "index" else dtype
            assert_dtype(buf, expected, f"layer {index} work buffer {key!r}")
        mask = getattr(layer, "_mask", None)
        if mask is not None:
            assert_dtype(mask, dtype, f"layer {index} dropout mask")


def data(dtype, n=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6)).astype(dtype), rng.integers(0, 3, n)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_forward_backward_keep_dtype(device, activation, dtype):
    model = make_model(device, dtype, activation).train()
    ops = model.backend
    assert_model_dtype(model, dtype)
    x, labels = data(dtype)
    out = model.forward(ops.asarray(x))
    assert_dtype(out, dtype, "forward output")
    loss = nn.SoftmaxCrossEntropy()
    value = loss.forward(out, ops.asarray(labels))
    assert_dtype(value, dtype, "loss value")
    assert value.shape == ()
    assert_dtype(loss.backward(), dtype, "loss gradient")
    model.backward(loss.backward())
    assert_model_dtype(model, dtype)
    # layer by layer, with input gradients
    dy = loss.backward()
    for index in range(len(model.layers) - 1, -1, -1):
        dy = model.layers[index].backward(dy, input_grad=True)
        assert_dtype(dy, dtype, f"input gradient of layer {index}")
    assert np.isfinite(host(model, model.flat_grads)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_activation_ops_keep_dtype(device, activation, dtype):
    """Each activation, called directly, keeps the dtype of its input and output."""
    ops = get_backend(device)
    act = activations.get(activation)
    z = ops.asarray(np.linspace(-3, 3, 12, dtype=dtype).reshape(3, 4))
    y = act.forward(ops, z.copy(), ops.empty(z.shape, dtype))
    assert_dtype(y, dtype, "activation output")
    dz = act.backward(ops, ops.asarray(np.ones((3, 4), dtype)), y, z, ops.empty(z.shape, dtype))
    assert_dtype(dz, dtype, "activation gradient")
    ref64 = act.forward(ops, ops.asarray(np.linspace(-3, 3, 12).reshape(3, 4)), ops.empty((3, 4), np.float64))
    np.testing.assert_allclose(ops.to_host(y), ops.to_host(ref64), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["softmax_ce", "mse_float", "mse_float64_target", "mse_labels",
                                  "sigmoid_ce", "sigmoid_ce_float64_target", "sigmoid_ce_int_target"])
def test_losses_keep_dtype(device, kind, dtype):
    ops = get_backend(device)
    rng = np.random.default_rng(2)
    y = ops.asarray(rng.standard_normal((7, 4)).astype(dtype))
    targets = {
        "softmax_ce": (nn.SoftmaxCrossEntropy, rng.integers(0, 4, 7)),
        "mse_float": (nn.MeanSquaredError, rng.standard_normal((7, 4)).astype(dtype)),
        "mse_float64_target": (nn.MeanSquaredError, rng.standard_normal((7, 4))),
        "mse_labels": (nn.MeanSquaredError, rng.integers(0, 4, 7)),
        "sigmoid_ce": (nn.SigmoidCrossEntropy, rng.uniform(0, 1, (7, 4)).astype(dtype)),
        "sigmoid_ce_float64_target": (nn.SigmoidCrossEntropy, rng.uniform(0, 1, (7, 4))),
        "sigmoid_ce_int_target": (nn.SigmoidCrossEntropy, rng.integers(0, 2, (7, 4))),
    }
    make, target = targets[kind]
    loss = make()
    value = loss.forward(y, ops.asarray(target))
    assert_dtype(value, dtype, "loss value")
    assert value.shape == ()
    assert np.isfinite(float(value))
    assert_dtype(loss.backward(), dtype, "loss gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_steps_keep_dtype(device, name, dtype):
    model = make_model(device, dtype).train()
    ops = model.backend
    optimizer = OPTIMIZERS[name]()
    loss = nn.SoftmaxCrossEntropy()
    flat = model.flat_params
    for step in range(3):
        x, labels = data(dtype, seed=step)
        loss.forward(model.forward(ops.asarray(x)), ops.asarray(labels))
        model.backward(loss.backward())
        optimizer.step(model)
    assert model.flat_params is flat, "the update is in place"
    assert_model_dtype(model, dtype)
    for key, buf in optimizer.state.items():
        assert_dtype(buf, dtype, f"optimizer state {key!r}")
        assert buf.shape == model.flat_params.shape
    for key, buf in optimizer.state_dict()["buffers"].items():
        assert_dtype(buf, dtype, f"state_dict buffer {key!r}")
    # parameters still views of the flat buffer: writing through one shows in the other
    p = model.parameters()[0]
    p.data = ops.asarray(np.zeros(p.shape, dtype))
    assert float(abs(model.flat_params[: p.data.size]).sum()) == 0.0
    assert np.isfinite(host(model, model.flat_params)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("x_dtype", [np.float64, np.float32, np.uint8, np.int64])
def test_predict_returns_model_dtype(device, dtype, x_dtype):
    model = make_model(device, dtype)
    x = (np.random.default_rng(3).uniform(0, 5, (5, 6))).astype(x_dtype)
    out = model.predict(x)
    assert isinstance(out, np.ndarray)
    assert_dtype(out, dtype, "predict output")
    assert out.shape == (5, 3)
    assert_dtype(model.predict(x[:0]), dtype, "predict output of an empty batch")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_predict_in_several_batches_matches_forward(device, dtype):
    model = make_model(device, dtype)
    x = np.random.default_rng(4).standard_normal((7, 6)).astype(dtype)
    expected = host(model, model.forward(model.backend.asarray(x))).copy()
    assert_within(model.predict(x, batch_size=2), expected, difference_bound(model, x))  # BLAS: other shapes


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("loss_name", ["softmax_cross_entropy", "mse", "sigmoid_cross_entropy"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_trainer_fit_keeps_dtype(device, opt_name, loss_name, dtype):
    model = make_model(device, dtype)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 6))  # float64 on purpose: converted to the model dtype
    if loss_name == "sigmoid_cross_entropy":
        y = rng.integers(0, 2, (40, 3)).astype(np.float64)
    else:
        y = rng.integers(0, 3, 40)
    optimizer = OPTIMIZERS[opt_name]()
    trainer = nn.Trainer(model, loss=loss_name, optimizer=optimizer, batch_size=16, quiet=True,
                         schedule=nn.CosineAnnealing(3))
    history = trainer.fit(x, y, epochs=2, validation_data=(x[:10], y[:10]))
    for key in ("loss", "accuracy", "lr", "val_loss", "val_accuracy"):
        assert len(history[key]) == 2, key
        assert all(isinstance(v, float) and np.isfinite(v) for v in history[key]), key
    assert_model_dtype(model, dtype)
    for key, buf in optimizer.state.items():
        assert_dtype(buf, dtype, f"optimizer state {key!r}")
    # the trainer's prepared data and one step's loss value are in the model dtype too
    xp, yp = trainer.prepare(x, y)
    assert_dtype(xp, dtype, "prepared x")
    model.train()
    value, _ = trainer.train_step(xp[:16], yp[:16])
    assert_dtype(value, dtype, "train_step loss value")
    assert_model_dtype(model, dtype)
    assert_dtype(model.predict(x), dtype, "predict after fit")
    metrics = trainer.evaluate(x, y)
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_refuses_other_float_dtype(device, dtype):
    model = make_model(device, dtype)
    other = np.float64 if dtype == np.float32 else np.float32
    with pytest.raises(nn.ShapeError, match="dtype"):
        model.forward(model.backend.asarray(np.zeros((2, 6), other)))


def test_default_dtype_is_float32(device):
    model = nn.Sequential(nn.Dense(3, 2), device=device)
    assert model.dtype == np.float32
    assert_model_dtype(model, np.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_initial_weights_agree_across_dtypes(device, dtype):
    """Both dtypes draw the same initial weights (float64 ones rounded for float32)."""
    model = make_model(device, dtype)
    reference = make_model("cpu", np.float64)
    np.testing.assert_allclose(host(model, model.flat_params), host(reference, reference.flat_params),
                               rtol=1e-7 if dtype == np.float32 else 0)


@pytest.mark.parametrize("kind", ["he", "glorot"])
def test_a_large_float32_layer_is_initialised_without_a_float64_copy(kind):
    """The weights are the float64 draw rounded, bit for bit, yet drawn a block at a time: a layer of
    16 MiB in float32 needs well under the 32 MiB a float64 draw of it would take on top."""
    import math
    import tracemalloc

    from nnaccel.layers import init_weight

    shape = (2048, 2048)
    tracemalloc.start()
    try:
        weights = init_weight(kind, shape, 2048, 2048, np.random.default_rng(5), np.float32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert weights.dtype == np.float32 and peak < 1.25 * weights.nbytes, peak
    rng = np.random.default_rng(5)
    drawn = (rng.standard_normal(shape) * math.sqrt(2.0 / 2048) if kind == "he"
             else rng.uniform(-math.sqrt(6.0 / 4096), math.sqrt(6.0 / 4096), shape))
    np.testing.assert_array_equal(weights, drawn.astype(np.float32))


@pytest.mark.parametrize("saved_dtype,dtype", [(np.float64, np.float32), (np.float32, np.float64)],
                         ids=["float64-into-float32", "float32-into-float64"])
@pytest.mark.parametrize("opt_name", ["sgd-momentum", "adam"])
def test_resumed_optimizer_state_takes_model_dtype(device, tmp_path, opt_name, saved_dtype, dtype):
    """A checkpoint of the other dtype loads (weights are cast); the optimizer state must follow."""
    x, y = data(np.float64, n=20)
    saved = nn.Trainer(make_model(device, saved_dtype), optimizer=OPTIMIZERS[opt_name](), batch_size=8,
                       quiet=True)
    saved.fit(x, y, epochs=1)
    path = tmp_path / "checkpoint.npz"
    saved.save_checkpoint(path)
    resumed = nn.Trainer(make_model(device, dtype), optimizer=OPTIMIZERS[opt_name](), batch_size=8, quiet=True)
    resumed.load_checkpoint(path)
    resumed.fit(x, y, epochs=1)
    assert_model_dtype(resumed.model, dtype)
    for key, buf in resumed.optimizer.state.items():
        assert_dtype(buf, dtype, f"optimizer state {key!r}")


@pytest.mark.parametrize("x_dtype, value, exact", [
    (np.int16, -2 ** 15, True), (np.uint16, 2 ** 16 - 1, True), (np.int32, 2 ** 24, True),
    (np.int32, 2 ** 24 + 1, False), (np.int64, -(2 ** 31), False), (np.uint32, 2 ** 25, False),
])
def test_integer_inputs_convert_to_float32_only_where_exact(device, x_dtype, value, exact):
    """float32 holds every integer up to 2**24: wider integer inputs beyond it are refused, not rounded."""
    model = make_model(device, np.float32)
    trainer = nn.Trainer(model, quiet=True)
    x, y = np.full((4, 6), value, x_dtype), np.zeros(4, np.int64)
    if exact:
        prepared, _ = trainer.prepare(x, y)
        assert_dtype(prepared, np.float32, "prepared x")
        assert np.array_equal(host(model, prepared), x.astype(np.float64))
        assert_dtype(model.predict(x), np.float32, "predict output")
        return
    for call in (lambda: trainer.prepare(x, y), lambda: model.predict(x)):
        with pytest.raises(nn.ShapeError, match=rf"x has {np.dtype(x_dtype).name} values from .* but float32 holds "
                                                r"integers exactly only up to 16,777,216"):
            call()


BEYOND_FLOAT32 = r"has values up to 1e\+39 in size, beyond float32's range \(3\.4e\+38\); scale"


@pytest.mark.filterwarnings("error")  # NumPy's overflow warning from the cast fails the test
@pytest.mark.parametrize("value", [1e39, -1e39])
def test_float64_inputs_beyond_float32s_range_are_refused(device, value):
    """1e39 would be inf in float32: prepare (fit, evaluate) and predict name x's largest magnitude and
    float32's range, not "NaN or inf" (x holds none) nor NaN outputs with an overflow warning."""
    model = make_model(device, np.float32)
    trainer = nn.Trainer(model, quiet=True)
    x, y = np.zeros((4, 6)), np.zeros(4, np.int64)
    x[1, 2] = value
    for call in (trainer.prepare, trainer.fit, trainer.evaluate, lambda x, y: model.predict(x)):
        with pytest.raises(nn.ShapeError, match="^x " + BEYOND_FLOAT32):
            call(x, y)


@pytest.mark.filterwarnings("error")
def test_float64_targets_beyond_float32s_range_are_refused(device):
    """MSE's float targets are cast to float32 as x is: 1e39 is refused by name, not as NaN or inf."""
    trainer = nn.Trainer(make_model(device, np.float32), loss="mse", quiet=True)
    y = np.zeros((4, 3))
    y[2, 1] = 1e39
    with pytest.raises(nn.ShapeError, match="^y " + BEYOND_FLOAT32):
        trainer.prepare(np.zeros((4, 6)), y)


@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_nan_or_inf_inputs_and_targets_are_reported_as_such_beside_values_beyond_float32s_range(device, value):
    """NaN and inf are the problem to name where they come with 1e39: the range message is for finite data."""
    trainer = nn.Trainer(make_model(device, np.float32), loss="mse", quiet=True)
    x, y = np.zeros((4, 6)), np.zeros((4, 3))
    x[0, :2] = y[0, :2] = value, 1e39
    with pytest.raises(nn.ShapeError, match="^x contains NaN or inf values$"):
        trainer.prepare(x, np.zeros((4, 3)))
    with pytest.raises(nn.ShapeError, match="^y contains NaN or inf values$"):
        trainer.prepare(np.zeros((4, 6)), y)


def test_float64_data_up_to_float32s_largest_value_converts():
    """The range check refuses only what overflows: float32's largest magnitude itself converts."""
    model = make_model("cpu", np.float32)
    big = float(np.finfo(np.float32).max)
    x, y = np.full((4, 6), big), np.full((4, 3), -big)
    prepared_x, prepared_y = nn.Trainer(model, loss="mse", quiet=True).prepare(x, y)
    assert_dtype(prepared_x, np.float32, "prepared x")
    assert np.array_equal(prepared_x, x) and np.array_equal(prepared_y, y)


def test_a_float64_model_takes_values_beyond_float32s_range(device):
    """float32's range is a float32 model's limit only: a float64 model keeps 1e39 as given."""
    model = make_model(device, np.float64)
    x, y = np.full((4, 6), 1e39), np.full((4, 3), -1e39)
    prepared_x, prepared_y = nn.Trainer(model, loss="mse", quiet=True).prepare(x, y)
    assert np.array_equal(host(model, prepared_x), x) and np.array_equal(host(model, prepared_y), y)
    assert_dtype(model.predict(x), np.float64, "predict output")
