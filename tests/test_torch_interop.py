"""PyTorch weights in and out: ``to_torch`` and ``from_torch`` for an MLP with every activation and a
LeNet-like net with BatchNorm and both poolings; same outputs in eval mode, same gradients in training
mode, bit-identical round trips; unsupported modules and options refused by name."""

import sys

import numpy as np
import pytest

import nnaccel as nn
from test_conv import randomise

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = {np.float32: {"rtol": 1e-5, "atol": 1e-5}, np.float64: {"rtol": 1e-10, "atol": 1e-12}}
GRAD_TOL = {np.float32: {"rtol": 1e-4, "atol": 1e-5}, np.float64: {"rtol": 1e-10, "atol": 1e-12}}
DTYPE_IDS = ["float32", "float64"]
ACTIVATIONS = [nn.Linear(), nn.ReLU(), nn.LeakyReLU(0.2), nn.ELU(0.5), nn.Sigmoid(), nn.Tanh(), nn.Softplus(),
               nn.GELU(), nn.SiLU(), nn.Softmax()]
ACTIVATION_IDS = [repr(activation) for activation in ACTIVATIONS]
IMAGE = (1, 12, 12)


def mlp(activation, dtype=np.float32, device="cpu"):
    model = nn.Sequential(nn.Dense(20, 16, activation=activation), nn.Dropout(0.25),
                          nn.Dense(16, 12, activation=activation), nn.BatchNorm(12), nn.Dense(12, 5),
                          seed=1, dtype=dtype, device=device)
    randomise(model, np.random.default_rng(2))
    return model


def lenet(dtype=np.float32, dropout=0.25):
    model = nn.Sequential(nn.Conv2D(1, 4, 3, padding=1, activation="relu"), nn.BatchNorm(4), nn.MaxPool2D(2),
                          nn.Conv2D(4, 6, (3, 2), stride=(1, 2), padding=(1, 0), activation="tanh"),
                          nn.AvgPool2D(3, stride=2, padding=1), nn.Flatten(), nn.Dropout(dropout),
                          nn.Dense(36, 16, activation="gelu"), nn.BatchNorm(16), nn.Dense(16, 10),
                          input_shape=IMAGE, seed=3, dtype=dtype)
    randomise(model, np.random.default_rng(4))
    return model


def batch(model, rng, size=8):
    """Inputs away from zero on average, so that BatchNorm's statistics move."""
    return (rng.standard_normal((size, *model.input_shape)) * 1.5 + 0.3).astype(model.dtype)


def warm_up(model, x):
    """Two training forwards: BatchNorm's running statistics are then not the defaults."""
    model.train()
    for _ in range(2):
        model.forward(model.backend.asarray(x))
    model.eval()


def assert_same_function(model, twin, x):
    twin.eval()
    np.testing.assert_allclose(twin(torch.from_numpy(x)).detach().numpy(), model.predict(x),
                               **TOL[model.dtype.type])


def assert_same_gradients(model, twin, x, labels):
    """Forward, loss and every parameter gradient in training mode (Dropout off: its masks differ)."""
    ops = model.backend
    model.train()
    twin.train()
    loss = nn.SoftmaxCrossEntropy()
    value = loss.forward(model.forward(ops.asarray(x)), ops.asarray(labels))
    model.backward(loss.backward())
    t_value = F.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(labels))
    t_value.backward()
    tol = GRAD_TOL[model.dtype.type]
    np.testing.assert_allclose(float(value), t_value.item(), **tol)
    for p, t_param in zip(model.parameters(), twin.parameters(), strict=True):
        expected = t_param.grad.numpy()
        expected = expected.T if expected.ndim == 2 else expected  # a Linear weight is (out, in)
        np.testing.assert_allclose(ops.to_host(p.grad), expected, **tol, err_msg=f"gradient of {p.name}")


def assert_bit_identical(model, other):
    assert other.config() == model.config()
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        np.testing.assert_array_equal(other.backend.to_host(q.data), model.backend.to_host(p.data), err_msg=p.name)
    for (name, b), (_, c) in zip(model.buffers(), other.buffers(), strict=True):
        np.testing.assert_array_equal(other.backend.to_host(c), model.backend.to_host(b), err_msg=name)


# ----- nnaccel -> torch -> nnaccel -------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_an_mlp_goes_to_torch_and_back(activation):
    model = mlp(activation)
    rng = np.random.default_rng(5)
    x = batch(model, rng)
    warm_up(model, x)
    twin = model.to_torch()
    assert not twin.training and next(twin.parameters()).dtype == torch.float32
    assert_same_function(model, twin, x)
    assert_bit_identical(model, nn.Sequential.from_torch(twin, seed=1))
    model.layers[1].rate = 0.0  # the same gradients need the same (no) dropout
    assert_same_gradients(model, model.to_torch(), x, rng.integers(0, 5, len(x)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
def test_a_lenet_goes_to_torch_and_back(dtype):
    model = lenet(dtype)
    rng = np.random.default_rng(6)
    x = batch(model, rng)
    warm_up(model, x)
    twin = model.to_torch()
    assert [type(m).__name__ for m in twin] == [
        "Conv2d", "ReLU", "BatchNorm2d", "MaxPool2d", "Conv2d", "Tanh", "AvgPool2d", "Flatten", "Dropout", "Linear",
        "GELU", "BatchNorm1d", "Linear"]
    assert twin[6].count_include_pad and twin[2].running_var.dtype == getattr(torch, np.dtype(dtype).name)
    assert_same_function(model, twin, x)
    assert_bit_identical(model, nn.Sequential.from_torch(twin, input_shape=IMAGE, seed=3))
    no_dropout = lenet(dtype, dropout=0.0)
    warm_up(no_dropout, x)
    assert_same_gradients(no_dropout, no_dropout.to_torch(), x, rng.integers(0, 10, len(x)))


def test_the_round_trip_works_from_any_device(device):
    model = mlp("relu", device=device)
    back = nn.Sequential.from_torch(model.to_torch(), device=device, seed=1)
    assert back.device == model.device
    assert_bit_identical(model, back)


def test_random_shift_is_left_out_and_training_mode_carried_over():
    model = nn.Sequential(nn.RandomShift(2), nn.Conv2D(1, 2, 3, activation="softmax"), nn.Flatten(),
                          input_shape=(1, 5, 5)).train()
    twin = model.to_torch()
    assert twin.training and [type(m).__name__ for m in twin] == ["Conv2d", "Softmax", "Flatten"]
    assert_same_function(model, twin, batch(model, np.random.default_rng(0)))


# ----- torch -> nnaccel ------------------------------------------------------------------------------------
def torch_activation(activation):
    return {"linear": torch.nn.Identity(), "relu": torch.nn.ReLU(), "leaky_relu": torch.nn.LeakyReLU(0.2),
            "elu": torch.nn.ELU(0.5), "sigmoid": torch.nn.Sigmoid(), "tanh": torch.nn.Tanh(),
            "softplus": torch.nn.Softplus(), "gelu": torch.nn.GELU(), "silu": torch.nn.SiLU(),
            "softmax": torch.nn.Softmax(dim=-1)}[activation.name]


def trained_in_torch(net, x):
    """Two training forwards in torch (so BatchNorm's running statistics move), then eval mode."""
    for _ in range(2):
        net(torch.from_numpy(x))
    return net.eval()


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_a_torch_mlp_comes_over(activation):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 16), torch_activation(activation), torch.nn.Dropout(0.1),
                              torch.nn.Linear(16, 12, bias=False), torch.nn.BatchNorm1d(12, momentum=0.2, eps=1e-3),
                              torch.nn.Linear(12, 5))
    x = np.random.default_rng(7).standard_normal((8, 20)).astype(np.float32)
    model = nn.Sequential.from_torch(trained_in_torch(net, x))
    assert model.input_shape == (20,) and model.layers[0].activation == activation
    assert model.layers[1].rate == 0.1 and model.layers[3].momentum == 0.2 and model.layers[3].eps == 1e-3
    np.testing.assert_array_equal(model.layers[2].params["bias"].data, 0)
    assert_same_function(model, net, x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
def test_a_torch_lenet_comes_over(dtype):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.BatchNorm2d(4), torch.nn.MaxPool2d(3, 2, 1),
        torch.nn.Conv2d(4, 6, (2, 3), stride=(2, 1)), torch.nn.ELU(), torch.nn.AvgPool2d(2, padding=1),
        torch.nn.Flatten(), torch.nn.Identity(), torch.nn.Linear(36, 10), torch.nn.Softmax(dim=1)
    ).to(getattr(torch, np.dtype(dtype).name))
    x = (np.random.default_rng(8).standard_normal((8, *IMAGE)) + 0.5).astype(dtype)
    model = nn.Sequential.from_torch(trained_in_torch(net, x), input_shape=IMAGE)
    assert model.dtype == dtype and [type(layer).__name__ for layer in model.layers] == [
        "Conv2D", "BatchNorm", "MaxPool2D", "Conv2D", "AvgPool2D", "Flatten", "Dense"]
    assert not np.allclose(model.layers[1].buffers["running_mean"], 0)
    assert_same_function(model, net, x)


def test_a_torch_conv_batchnorm_relu_net_comes_over_and_goes_back():
    """PyTorch's block order, the activation after the BatchNorm (and a Conv2d without bias before it)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(144, 16), torch.nn.BatchNorm1d(16),
        torch.nn.SiLU(), torch.nn.Linear(16, 10))
    x = (np.random.default_rng(9).standard_normal((8, *IMAGE)) + 0.5).astype(np.float32)
    model = nn.Sequential.from_torch(trained_in_torch(net, x), input_shape=IMAGE)
    assert [repr(layer) for layer in model.layers] == [
        "Conv2D(1, 4, 3, padding=1)", "BatchNorm(4, activation='relu')", "MaxPool2D(2)", "Flatten()",
        "Dense(144, 16)", "BatchNorm(16, activation='silu')", "Dense(16, 10)"]
    assert_same_function(model, net, x)
    back = model.to_torch()  # with the Conv2d's bias (zeros), whose gradient is then compared too
    assert [type(module).__name__ for module in back] == [type(module).__name__ for module in net]
    assert_same_function(model, back, x)
    assert_same_gradients(model, back, x, np.arange(8))


# ----- what does not convert --------------------------------------------------------------------------------
@pytest.mark.parametrize("modules, message", [
    (lambda: [torch.nn.Conv2d(2, 4, 3, groups=2)], r"module 0, Conv2d\(2, 4, .*groups=2\): groups=2 is not supported"),
    (lambda: [torch.nn.Conv2d(1, 4, 3, dilation=2)], r"dilation=\(2, 2\) is not supported \(only dilation=1\)"),
    (lambda: [torch.nn.Conv2d(1, 4, 3, padding="same")], r"padding='same' is not supported"),
    (lambda: [torch.nn.Conv2d(1, 4, 3, padding_mode="reflect")], r"padding_mode='reflect' is not supported"),
    (lambda: [torch.nn.MaxPool2d(2, ceil_mode=True)], r"MaxPool2d\(.*\): ceil_mode=True is not supported"),
    (lambda: [torch.nn.AvgPool2d(2, count_include_pad=False)], r"count_include_pad=False is not supported"),
    (lambda: [torch.nn.AvgPool2d(2, divisor_override=3)], r"divisor_override=3 is not supported"),
    (lambda: [torch.nn.Flatten(), torch.nn.BatchNorm1d(144, affine=False)], r"affine=False is not supported"),
    (lambda: [torch.nn.Flatten(), torch.nn.BatchNorm1d(144, momentum=None)], r"momentum=None .* is not supported"),
    (lambda: [torch.nn.Flatten(), torch.nn.BatchNorm2d(144)],
     r"module 1, BatchNorm2d\(144.*\), takes \(channels, height, width\) samples but gets 144"),
    (lambda: [torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm1d(2), torch.nn.Flatten()],
     r"module 1, BatchNorm1d\(2.*\), takes \(features\) samples but gets 2x10x10"),
    (lambda: (lambda shared: [torch.nn.Conv2d(1, 2, 3), shared, torch.nn.Flatten(), torch.nn.Linear(200, 2), shared])(
        torch.nn.BatchNorm1d(2)),  # tied weights: nnaccel's copies would train apart (they were copied)
     r"^module 4, BatchNorm1d\(2.*\) shares its weight with module 1 \(tied weights\): nnaccel has no weight "
     r"sharing, so the copies would train apart$"),
    (lambda: (lambda shared: [torch.nn.Flatten(), shared, torch.nn.ReLU(), shared])(torch.nn.Linear(144, 144)),
     r"^module 3, Linear\(in_features=144, .*\) shares its weight with module 1 \(tied weights\)"),
    (lambda: (lambda first, second: setattr(second, "bias", first.bias) or [torch.nn.Flatten(), first, second])(
        torch.nn.Linear(144, 144), torch.nn.Linear(144, 144)),
     r"^module 2, Linear\(.*\) shares its bias with module 1"),
    (lambda: [torch.nn.Identity(), torch.nn.Flatten(), torch.nn.Linear(144, 3), torch.nn.ReLU(), torch.nn.Linear(5, 2)],
     r"^module 4, Linear\(in_features=5, .*\): layer sizes do not chain: layer 2, Dense\(5, 2\), after layer 1, "
     r"Dense\(144, 3, activation='relu'\): takes 5 inputs but gets 3"),  # was named by nnaccel's numbers only
    (lambda: [torch.nn.Flatten(0)], r"start_dim=0 is not supported"),
    (lambda: [torch.nn.Flatten(), torch.nn.Linear(144, 4), torch.nn.ReLU(), torch.nn.Dropout(1.0)],
     r"module 3, Dropout\(p=1.0, inplace=False\): Dropout rate must be .* < 1, got 1.0"),
    (lambda: [torch.nn.Flatten(), torch.nn.BatchNorm1d(144, eps=0)],
     r"module 1, BatchNorm1d\(144, eps=0, .*\): BatchNorm eps must be a finite number > 0, got 0"),
    (lambda: [torch.nn.Flatten(), torch.nn.BatchNorm1d(144, momentum=1.5)],
     r"module 1, BatchNorm1d\(144, .*momentum=1.5.*\): BatchNorm momentum must be in \[0, 1\], got 1.5"),
    (lambda: [torch.nn.LSTM(12, 4)],
     r"module 0, LSTM\(12, 4\) has no nnaccel equivalent; from_torch supports Linear, Conv2d"),
    (lambda: [torch.nn.Flatten(), torch.nn.Sequential(torch.nn.Linear(144, 2))], r"(?s)Sequential\(.*has no nnaccel"),
    (lambda: [torch.nn.Conv2d(1, 2, 3), torch.nn.MaxPool2d(2), torch.nn.ReLU()],
     r"module 2, ReLU\(\) comes after MaxPool2d.*must directly follow a Linear, Conv2d or BatchNorm"),
    (lambda: [torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Softmax(dim=-1)],
     r"module 2, Softmax\(dim=-1\): only a softmax over dim 1"),
    (lambda: [torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Softmax(dim=1)],
     r"module 2, Softmax\(dim=1\) after BatchNorm2d\(2.*\): nnaccel's BatchNorm applies a softmax over features "
     r"only"),
    (lambda: [torch.nn.ReLU()], r"ReLU\(\) comes first"),
    (lambda: [torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Tanh()], r"module 2, Tanh\(\) comes after ReLU\(\)"),
    (lambda: [torch.nn.Flatten(), torch.nn.Linear(144, 4), torch.nn.GELU("tanh")],
     r"approximate='tanh' is not supported \(only approximate='none'\)"),
    (lambda: [torch.nn.Flatten(), torch.nn.Linear(144, 4), torch.nn.Softplus(beta=2)], r"beta=2 is not supported"),
    (lambda: [torch.nn.Conv2d(1, 2, 3), torch.nn.Softmax(dim=-1)], r"only a softmax over dim 1"),
])
def test_unsupported_torch_modules_and_options_are_named(modules, message):
    with pytest.raises(nn.ConfigError, match=message):
        nn.Sequential.from_torch(torch.nn.Sequential(*modules()), input_shape=IMAGE)


def test_from_torch_finds_the_input_shape_of_a_conv_net_or_asks_for_it():
    """Left out: 28x28 (the digits') where the layers chain on it, else the one square side that fits the
    first Linear; a ConfigError naming the net when no side fits."""
    conv = [torch.nn.Conv2d(3, 2, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten()]
    assert nn.Sequential.from_torch(torch.nn.Sequential(*conv)).input_shape == (3, 28, 28)
    assert nn.Sequential.from_torch(torch.nn.Sequential(*conv, torch.nn.Linear(2 * 13 * 13, 10))).input_shape == \
        (3, 28, 28)
    unpooled = [torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 10 * 10, 10)]
    assert nn.Sequential.from_torch(torch.nn.Sequential(*unpooled)).input_shape == (3, 12, 12)
    assert nn.Sequential.from_torch(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 4))).input_shape == \
        (1, 12, 12)
    batchnorm_first = [torch.nn.BatchNorm1d(20), torch.nn.Linear(20, 4)]  # no Conv2d, no square side: flat
    assert nn.Sequential.from_torch(torch.nn.Sequential(*batchnorm_first)).input_shape == (20,)
    assert nn.Sequential.from_torch(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, 4))).input_shape == \
        (10,)
    assert nn.Sequential.from_torch(torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
                                                        torch.nn.Linear(75, 10))).input_shape == (3, 5, 5)
    with pytest.raises(nn.ConfigError, match=r"e.g. \(1, 28, 28\), for a net that starts with MaxPool2d"):
        nn.Sequential.from_torch(torch.nn.Sequential(torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(10, 4)))
    dropout_first = [torch.nn.Dropout(0.1), torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(7, 2)]
    with pytest.raises(nn.ConfigError, match=r"for a net that starts with Conv2d\(1, 2, "):  # the first real layer
        nn.Sequential.from_torch(torch.nn.Sequential(*dropout_first))
    with pytest.raises(nn.ConfigError, match=r"needs input_shape, e.g. \(3, 28, 28\), .*: the layers chain on "
                                             r"3x12x12 to 3x13x13"):  # 13x13 pools to 5x5 too: not a guess
        nn.Sequential.from_torch(torch.nn.Sequential(*conv, torch.nn.Linear(2 * 5 * 5, 10)))
    with pytest.raises(nn.ConfigError, match=r"needs input_shape, e.g. \(1, 28, 28\), for a net that starts with "
                                             r"Conv2d\(1, 2, .*: the layers chain on no 1-channel square image"):
        nn.Sequential.from_torch(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(),
                                                     torch.nn.Linear(7, 2)))
    with pytest.raises(nn.ConfigError, match="takes a torch.nn.Sequential, got a Linear"):
        nn.Sequential.from_torch(torch.nn.Linear(3, 2))
    with pytest.raises(nn.ConfigError, match="all float32 or all float64, got float16"):
        nn.Sequential.from_torch(torch.nn.Sequential(torch.nn.Linear(3, 2).half()))
    with pytest.raises(nn.ConfigError, match="all float32 or all float64, got bfloat16"):  # no NumPy type
        nn.Sequential.from_torch(torch.nn.Sequential(torch.nn.Linear(3, 2).bfloat16()))


def test_maxout_has_no_torch_module():
    model = nn.Sequential(nn.Dense(6, 4), nn.Maxout(4, 3, pieces=2))
    with pytest.raises(nn.ConfigError, match=r"cannot convert layer 1 to PyTorch: Maxout\(4, 3\) has no PyTorch "
                                             r"equivalent"):
        model.to_torch()


def test_a_layer_of_ones_own_has_no_torch_module_nor_onnx_export():
    """A subclass may compute something else than the layer it extends (here ones), so it converts to
    nothing; one without config() is named by its class."""
    from nnaccel.layers import Layer
    from nnaccel.onnx import to_onnx

    pytest.importorskip("onnx")

    class Ones(nn.Dense):
        def forward(self, x, training=False):
            return super().forward(x, training) * 0 + 1

    class Double(Layer):
        def forward(self, x, training=False):
            return x * 2

    for layer, shown in ((Ones(3, 2), r"Ones\(3, 2\)"), (Double(), r"Double\(\.\.\.\)")):
        model = nn.Sequential(nn.Dense(3, 3), layer, input_shape=(3,))
        with pytest.raises(nn.ConfigError, match=rf"cannot convert layer 1 to PyTorch: {shown} has no PyTorch"):
            model.to_torch()
        with pytest.raises(nn.ConfigError, match=rf"layer 1, {shown}, has no ONNX export"):
            to_onnx(model)


def test_without_torch_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(nn.ConfigError, match="needs PyTorch: pip install torch"):
        nn.Sequential(nn.Dense(4, 2)).to_torch()
    with pytest.raises(nn.ConfigError, match="needs PyTorch: pip install torch"):
        nn.Sequential.from_torch(None)
