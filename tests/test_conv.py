"""Convolutional nets on every device: Conv2D, pooling, BatchNorm, Flatten and RandomShift against PyTorch
on the same weights and against finite differences in float64; shapes through the model; BatchNorm's
running statistics; the augmentation's draws."""

import numpy as np
import pytest

import nnaccel as nn
from nnaccel.backend.base import Window
from nnaccel.backend.numpy_backend import NumpyBackend
from test_gradients import assert_matches_finite_differences, host

torch = pytest.importorskip("torch")
F = torch.nn.functional
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
TOL = {np.float32: {"rtol": 1e-4, "atol": 1e-5}, np.float64: {"rtol": 1e-10, "atol": 1e-12}}
DTYPE_IDS = ["float32", "float64"]
TORCH_ACT = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "gelu": torch.nn.GELU,
             "sigmoid": torch.nn.Sigmoid, "silu": torch.nn.SiLU, "softplus": torch.nn.Softplus,
             "elu": torch.nn.ELU, "softmax": lambda: torch.nn.Softmax(dim=1)}


def torch_twin(model, dtype):
    """A torch.nn.Sequential computing what ``model`` computes, with its weights and buffers copied."""
    modules, shape = [], model.input_shape
    for layer, out_shape in zip(model.layers, model.shapes[1:]):
        params = {name: torch.from_numpy(np.array(host(model, p.data))) for name, p in layer.params.items()}
        if isinstance(layer, nn.Conv2D):
            module = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                     layer.padding, dtype=TORCH_DTYPE[dtype])
            module.weight.data.copy_(params["weight"])
            module.bias.data.copy_(params["bias"])
            modules += [module, TORCH_ACT[layer.activation.name]()]
        elif isinstance(layer, nn.Dense):
            module = torch.nn.Linear(layer.in_features, layer.out_features, dtype=TORCH_DTYPE[dtype])
            module.weight.data.copy_(params["weight"].T)
            module.bias.data.copy_(params["bias"])
            modules += [module, TORCH_ACT[layer.activation.name]()]
        elif isinstance(layer, nn.MaxPool2D):
            modules.append(torch.nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding))
        elif isinstance(layer, nn.AvgPool2D):
            modules.append(torch.nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding, count_include_pad=True))
        elif isinstance(layer, nn.Flatten):
            modules.append(torch.nn.Flatten())
        elif isinstance(layer, nn.BatchNorm):
            kind = torch.nn.BatchNorm2d if len(shape) == 3 else torch.nn.BatchNorm1d
            module = kind(layer.num_features, eps=layer.eps, momentum=layer.momentum, dtype=TORCH_DTYPE[dtype])
            module.weight.data.copy_(params["weight"])
            module.bias.data.copy_(params["bias"])
            module.running_mean.copy_(torch.from_numpy(np.array(host(model, layer.buffers["running_mean"]))))
            module.running_var.copy_(torch.from_numpy(np.array(host(model, layer.buffers["running_var"]))))
            modules += [module, TORCH_ACT[layer.activation.name]()]
        else:
            raise AssertionError(layer)
        shape = out_shape
    return torch.nn.Sequential(*modules)


def torch_grads(twin):
    """Its parameters' gradients in nnaccel's order and layout (Linear weights transposed)."""
    grads = []
    for module in twin:
        for name in ("weight", "bias"):
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.nn.Parameter):
                grad = tensor.grad.numpy()
                grads.append(grad.T if isinstance(module, torch.nn.Linear) and name == "weight" else grad)
    return grads


def randomise(model, rng, scale=0.4):
    """Random weights and non-zero biases; BatchNorm's gammas around 1."""
    for p in model.parameters():
        centre = 1.0 if p.name.endswith("weight") and len(p.shape) == 1 else 0.0
        p.data = model.backend.asarray((rng.standard_normal(p.shape) * scale + centre).astype(model.dtype))


CONVS = [  # (in, out, kernel, stride, padding, height, width)
    (1, 3, 3, 1, 0, 7, 7),
    (2, 4, (3, 2), (2, 1), (1, 0), 9, 8),
    (3, 2, 5, 2, 2, 11, 10),
    (2, 3, 1, 1, 0, 5, 5),
    (2, 3, 4, 3, 1, 10, 13),
]
POOLS = [(2, None, 0), (3, 2, 1), (3, 1, 0), ((2, 3), (1, 2), (1, 0)), (2, 3, 0)]  # (kernel, stride, padding)


def compare_with_torch(model, dtype, x, labels):
    """Forward, loss and every gradient (parameters and input) against the torch twin, in training mode."""
    ops = model.backend
    twin = torch_twin(model, dtype)
    model.train()
    twin.train()
    loss = nn.SoftmaxCrossEntropy()
    out = model.forward(ops.asarray(x))
    value = loss.forward(out, ops.asarray(labels))
    dy = loss.backward()
    for layer in reversed(model.layers):
        dy = layer.backward(dy, input_grad=True)
    tx = torch.from_numpy(x).requires_grad_(True)
    t_out = twin(tx)
    t_value = F.cross_entropy(t_out, torch.from_numpy(labels))
    t_value.backward()
    tol = TOL[dtype]
    np.testing.assert_allclose(host(model, out), t_out.detach().numpy(), **tol, err_msg="forward")
    np.testing.assert_allclose(float(value), t_value.item(), **tol, err_msg="loss")
    for p, expected in zip(model.parameters(), torch_grads(twin), strict=True):
        np.testing.assert_allclose(host(model, p.grad), expected, **tol, err_msg=f"gradient of {p.name}")
    np.testing.assert_allclose(host(model, dy), tx.grad.numpy(), **tol, err_msg="input gradient")
    return twin


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("conv", CONVS, ids=[str(c) for c in CONVS])
@pytest.mark.parametrize("activation", ["relu", "gelu", "softmax"])  # softmax: over the channels at each pixel
def test_conv2d_matches_torch(device, conv, activation, dtype):
    cin, cout, kernel, stride, padding, h, w = conv
    layers = [nn.Conv2D(cin, cout, kernel, stride=stride, padding=padding, activation=activation), nn.Flatten()]
    width = nn.Sequential(*layers, input_shape=(cin, h, w)).out_features  # gone once read: the layers are free
    model = nn.Sequential(*layers, nn.Dense(width, 4), input_shape=(cin, h, w), device=device, seed=1, dtype=dtype)
    rng = np.random.default_rng(2)
    randomise(model, rng)
    x = rng.standard_normal((5, cin, h, w)).astype(dtype)
    compare_with_torch(model, dtype, x, rng.integers(0, 4, 5))


@pytest.mark.parametrize("batch_last", [False, True], ids=["image-major", "batch-last"])
def test_either_order_of_the_columns_holds_each_images_windows(batch_last):
    """The CPU backend keeps a convolution's positions batch-last, the generic code (and so the GPU's
    fallbacks) image-major, as the CUDA kernels: in both, ``by_image`` finds image n's window at each
    position, col2im is im2col's adjoint, and the NCHW output and its gradient are those positions'."""
    ops = NumpyBackend()
    ops.batch_last = batch_last
    window = Window(3, 2, 2, 1, 1, 0)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 7, 6))
    (n, c), (oh, ow) = x.shape[:2], window.output_size(7, 6)
    columns = ops.im2col(x, window, np.full((c * 3 * 2, n * oh * ow), np.nan))
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 2), axis=(2, 3))[:, :, ::2, ::1]
    np.testing.assert_array_equal(ops.by_image(columns, (c * 3 * 2,), n, (oh, ow)),
                                  windows.transpose(1, 4, 5, 0, 2, 3).reshape(c * 3 * 2, n, oh, ow))
    g = rng.standard_normal(columns.shape)
    np.testing.assert_allclose(np.vdot(columns, g), np.vdot(x, ops.col2im(g, window, np.empty_like(x))), rtol=1e-12)
    z, bias, linear = rng.standard_normal((2, n * oh * ow)), np.array([0.5, -1.0]), nn.activations.get("linear")
    y = ops.bias_act_to_nchw(z.copy(), bias, linear, np.empty_like(z), np.empty((n, 2, oh, ow)))
    expected = ops.by_image(z, (2,), n, (oh, ow)) + bias[:, None, None, None]
    np.testing.assert_array_equal(y, expected.transpose(1, 0, 2, 3))
    db = np.empty(2)
    dz = ops.act_backward_from_nchw(y, z, z, linear, np.empty_like(z), bias_grad=db)
    np.testing.assert_array_equal(ops.by_image(dz, (2,), n, (oh, ow)), y.transpose(1, 0, 2, 3))
    np.testing.assert_allclose(db, y.sum(axis=(0, 2, 3)), rtol=1e-12)


def test_a_convolutions_output_into_a_strided_array(device):
    """bias_act_to_nchw into an (N, C, H, W) array laid out (W, H, C, N) (the generic op, which the CUDA
    backend falls back to for it) writes what it writes into a contiguous one."""
    ops = nn.backend.get_backend(device)
    rng = np.random.default_rng(8)
    n, c, h, w = 3, 2, 4, 5
    z, bias = rng.standard_normal((c, n * h * w)).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    relu = nn.activations.get("relu")

    def output(y):
        return ops.to_host(ops.bias_act_to_nchw(ops.asarray(z.copy()), ops.asarray(bias), relu,
                                                ops.empty(z.shape), y))

    strided = ops.asarray(np.full((w, h, c, n), np.nan, np.float32)).T
    np.testing.assert_array_equal(output(strided), output(ops.empty((n, c, h, w))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("pool", POOLS, ids=[str(p) for p in POOLS])
@pytest.mark.parametrize("kind", [nn.MaxPool2D, nn.AvgPool2D])
def test_pooling_matches_torch(device, kind, pool, dtype):
    """Windows that overlap (stride < kernel), skip inputs (stride > kernel), and reach into the padding."""
    kernel, stride, padding = pool
    layers = [nn.Conv2D(2, 3, 3, padding=1, activation="tanh"), kind(kernel, stride, padding), nn.Flatten()]
    width = nn.Sequential(*layers, input_shape=(2, 9, 11)).out_features
    model = nn.Sequential(*layers, nn.Dense(width, 3), input_shape=(2, 9, 11), device=device, seed=3, dtype=dtype)
    rng = np.random.default_rng(4)
    randomise(model, rng)
    x = rng.standard_normal((4, 2, 9, 11)).astype(dtype)
    compare_with_torch(model, dtype, x, rng.integers(0, 3, 4))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(5, 3, 8, 6), (2, 1, 2, 2)], ids=["tiles", "one"])
def test_max_pooling_over_2x2_tiles_finds_the_first_maximum_and_any_nan(device, shape, dtype):
    """2x2 tiles have their own path (a tournament over contiguous planes, which leaves NaN windows to the
    general loop): every window's maximum and where it is, the first of tied values winning and a NaN
    counting as the maximum (the last NaN, as PyTorch CPU takes it), with infinities and signed zeros among
    the values."""
    ops = nn.backend.get_backend(device)
    rng = np.random.default_rng(9)
    x = rng.choice(np.array([-np.inf, -1.0, -0.0, 0.0, 0.5, 2.0, np.inf], dtype), size=shape)
    (n, c, _, w), (oh, ow) = shape, (shape[2] // 2, shape[3] // 2)
    for with_nan in (False, True):
        if with_nan:
            x.flat[[0, 1, x.size - 1]] = np.nan
        windows = x.reshape(n, c, oh, 2, ow, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, oh, ow, 4)
        nan = np.isnan(windows)  # the last NaN where there is one, else the first maximum
        where = np.where(nan.any(axis=-1), 3 - nan[..., ::-1].argmax(axis=-1), windows.argmax(axis=-1))
        rows, cols = np.meshgrid(np.arange(oh), np.arange(ow), indexing="ij")
        expected = (2 * rows + where // 2) * w + 2 * cols + where % 2
        y, index = ops.empty((n, c, oh, ow), dtype), ops.empty((n, c, oh, ow), np.int32)
        ops.maxpool_forward(ops.asarray(x), nn.backend.base.Window(2, 2, 2, 2, 0, 0), y, index)
        np.testing.assert_array_equal(ops.to_host(index), expected)
        np.testing.assert_array_equal(ops.to_host(y), windows.max(axis=-1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("pool", [(2, None, 0), (3, 2, 1)], ids=["tiles", "overlap"])
def test_max_pooling_sends_a_non_finite_gradient_only_to_its_maximum(device, pool, dtype):
    """An inf or NaN in dy reaches its window's maximum and no other input, as PyTorch's scatter does
    (0 * inf is NaN: a backward that multiplies by a mask would spread NaN over the whole window)."""
    kernel, stride, padding = pool
    model = nn.Sequential(nn.MaxPool2D(kernel, stride, padding), nn.Flatten(), input_shape=(2, 6, 8), device=device,
                          dtype=dtype)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 6, 8)).astype(dtype)
    out = model.forward(model.backend.asarray(x))
    dy = rng.standard_normal(out.shape).astype(dtype)
    dy.flat[[0, 7, 20]] = np.inf, -np.inf, np.nan
    dx = model.backend.asarray(dy)
    for layer in reversed(model.layers):
        dx = layer.backward(dx, input_grad=True)
    tx = torch.from_numpy(x).requires_grad_(True)
    F.max_pool2d(tx, kernel, stride, padding).flatten(1).backward(torch.from_numpy(dy))
    dx = host(model, dx)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **TOL[dtype])  # overlaps sum in another order
    assert np.isnan(dx).sum() == 1 and np.isinf(dx).sum() == 2


def assert_max_pooling_is_torchs(model, x):
    """``model``'s (a MaxPool2D and a Flatten) forward and input gradient equal torch CPU's bit for bit:
    the values and where each window's gradient goes. dy holds small whole numbers, so that sums over
    overlapping windows are exact in any order and every output's gradient shows where it went."""
    dy = np.random.default_rng(6).integers(1, 64, (len(x), model.out_features)).astype(x.dtype)
    out = model.forward(model.backend.asarray(x))
    dx = model.backend.asarray(dy)
    for layer in reversed(model.layers):
        dx = layer.backward(dx, input_grad=True)
    tx = torch.from_numpy(x).requires_grad_(True)
    pool = model.layers[0]
    t_out = F.max_pool2d(tx, pool.kernel_size, pool.stride, pool.padding).flatten(1)
    t_out.backward(torch.from_numpy(dy))
    np.testing.assert_array_equal(host(model, out), t_out.detach().numpy(), err_msg="forward")
    np.testing.assert_array_equal(host(model, dx), tx.grad.numpy(), err_msg="input gradient")


MAX_POOLS = [(2, None, 0), (2, 2, 1), (3, 2, 1), (3, 1, 1), ((2, 3), (1, 2), (1, 0))]  # (kernel, stride, padding)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("pool", MAX_POOLS, ids=[str(p) for p in MAX_POOLS])
def test_max_pooling_of_minus_infinity_picks_a_real_input_as_torch(device, pool, dtype):
    """A window whose real inputs are all -inf has -inf as its maximum and sends its gradient to its first
    real input, as PyTorch does, never to the padding (where the gradient would be lost)."""
    model = nn.Sequential(nn.MaxPool2D(*pool), nn.Flatten(), input_shape=(3, 6, 8), device=device, dtype=dtype)
    x = np.random.default_rng(7).standard_normal((2, 3, 6, 8)).astype(dtype)
    x[0, 0] = -np.inf  # every window
    x[0, 1, :3, :3] = x[1, 2, 3:, 5:] = -np.inf  # corner windows that reach into the padding
    x[1, 0, :, ::2] = -np.inf  # and windows that meet finite inputs
    assert_max_pooling_is_torchs(model, x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("pool", MAX_POOLS, ids=[str(p) for p in MAX_POOLS])
def test_max_pooling_of_nan_is_nan_and_sends_the_gradient_to_the_last_nan_as_torch(device, pool, dtype):
    """A window holding a NaN has NaN as its maximum; its gradient goes to its NaN, or to the last of its
    NaNs in row-major order where it holds several (PyTorch CPU's rule: every NaN replaces the maximum so
    far), with infinities beside them."""
    model = nn.Sequential(nn.MaxPool2D(*pool), nn.Flatten(), input_shape=(3, 6, 8), device=device, dtype=dtype)
    x = np.random.default_rng(8).standard_normal((2, 3, 6, 8)).astype(dtype)
    x[0, 0, 2, 5] = np.nan  # one NaN
    x[0, 1, 1:4, 2:5] = np.nan  # several in a window
    x[0, 1, 0, 0], x[0, 1, 5, 7] = np.inf, -np.inf
    x[1, 2, ::3, ::2] = np.nan  # scattered, some windows holding two
    x[1, 2, 1, 1::2] = np.inf
    assert_max_pooling_is_torchs(model, x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("pool", MAX_POOLS, ids=[str(p) for p in MAX_POOLS])
def test_max_pooling_sends_a_tied_maximums_gradient_to_the_first_as_torch(device, pool, dtype):
    """Among equal maxima (0 and -0.0 among them) the first in row-major order gets the gradient, as in
    PyTorch. A zero maximum's sign is not compared: the CPU's is NumPy's maximum's, PyTorch's the first's."""
    model = nn.Sequential(nn.MaxPool2D(*pool), nn.Flatten(), input_shape=(3, 6, 8), device=device, dtype=dtype)
    x = np.random.default_rng(9).choice(np.array([-1.0, -0.0, 0.0, 1.0], dtype), size=(2, 3, 6, 8))
    x[1, 1] = 1.0  # all of a plane
    assert_max_pooling_is_torchs(model, x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("spatial, activations", [(True, ("relu", None)), (False, ("tanh", None)),
                                                  (True, (None, "relu")), (False, (None, "gelu")),
                                                  (False, (None, "softmax"))],
                         ids=["2d", "1d", "conv-bn-relu", "dense-bn-gelu", "dense-bn-softmax"])
def test_batchnorm_matches_torch_in_training_and_eval(device, spatial, activations, dtype):
    """Batch statistics while training, running estimates (PyTorch's momentum, unbiased variance) after;
    an activation before the BatchNorm or after it (PyTorch's Conv2d-BatchNorm2d-ReLU)."""
    rng = np.random.default_rng(5)
    before, after = activations
    if spatial:
        layers, shape = [nn.Conv2D(2, 3, 3, activation=before), nn.BatchNorm(3, momentum=0.3, activation=after),
                         nn.Flatten()], (2, 6, 7)
    else:
        layers, shape = [nn.Flatten(), nn.Dense(84, 6, activation=before), nn.BatchNorm(6, activation=after)], (2, 6, 7)
    width = nn.Sequential(*layers, input_shape=shape).out_features
    model = nn.Sequential(*layers, nn.Dense(width, 3), input_shape=shape, device=device, seed=6, dtype=dtype)
    randomise(model, rng)
    x = (rng.standard_normal((8, *shape)) * 2 + 0.5).astype(dtype)
    labels = rng.integers(0, 3, 8)
    twin = compare_with_torch(model, dtype, x, labels)
    bn = next(layer for layer in model.layers if isinstance(layer, nn.BatchNorm))
    t_bn = next(m for m in twin if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)))
    for _ in range(2):  # two more training forwards move the running estimates further
        model.train()
        model.forward(model.backend.asarray(x))
        twin(torch.from_numpy(x))
    tol = TOL[dtype]
    np.testing.assert_allclose(host(model, bn.buffers["running_mean"]), t_bn.running_mean.numpy(), **tol)
    np.testing.assert_allclose(host(model, bn.buffers["running_var"]), t_bn.running_var.numpy(), **tol)
    model.eval()
    twin.eval()
    np.testing.assert_allclose(model.predict(x), twin(torch.from_numpy(x)).detach().numpy(), **tol, err_msg="eval")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
def test_images_between_layers_in_the_backends_layout_and_a_short_batch(device, dtype):
    """The default recipe's layers (without the random shift) against PyTorch at batch 8, then at batch 5.
    On the CPU every image a layer hands on, forward and backward, is batch-last (each pixel's images
    together) and dense: the batch of 5 has work arrays of its own, not the leading rows of those of 8,
    which would leave gaps (elsewhere it takes those rows); a convolution's activation writes its output
    images in place."""
    rng = np.random.default_rng(8)
    model = nn.Sequential(nn.Conv2D(1, 3, 3, padding=1), nn.BatchNorm(3, activation="relu"), nn.MaxPool2D(2),
                          nn.Conv2D(3, 4, 3, activation="relu"), nn.BatchNorm(4), nn.MaxPool2D(2), nn.Flatten(),
                          nn.Dense(4, 3), input_shape=(1, 8, 8), device=device, seed=3, dtype=dtype)
    randomise(model, rng)
    for batch in (8, 5):
        x = rng.standard_normal((batch, 1, 8, 8)).astype(dtype)
        compare_with_torch(model, dtype, x, rng.integers(0, 3, batch))
    if device != "cpu":
        return
    out, images = model.backend.asarray(x), []
    for layer in model.layers:
        out = layer.forward(out, training=True)
        images += [out] if out.ndim == 4 else []
        assert not isinstance(layer, nn.Conv2D) or np.shares_memory(out, layer._rows)  # written in place
    dy = model.backend.asarray(np.ones((5, 3), dtype))
    for layer in reversed(model.layers[1:]):
        dy = layer.backward(dy)
        images += [dy] if dy.ndim == 4 else []
    assert len(images) == 12 and all(image.transpose(1, 2, 3, 0).flags.c_contiguous for image in images)


def test_image_work_arrays_stay_bounded_over_many_batch_sizes(device):
    """Predictions at 1, 2, ..., 12 samples keep at most four batch sizes of image work arrays per array (on
    the CPU, where each size has its own); the answers are the model's at every size."""
    model = nn.Sequential(nn.Conv2D(1, 3, 3, padding=1, activation="relu"), nn.MaxPool2D(2), nn.Flatten(),
                          nn.Dense(48, 3), input_shape=(1, 8, 8), device=device, seed=4)
    x = np.random.default_rng(9).standard_normal((12, 1, 8, 8)).astype(np.float32)
    whole = model.predict(x)
    for n in range(1, 13):
        np.testing.assert_allclose(model.predict(x[:n]), whole[:n], rtol=1e-5, atol=1e-6)
    for layer in model.layers:
        names = [key[0] if isinstance(key, tuple) else key for key in layer._work]
        assert all(names.count(name) <= 4 for name in names), (layer, names)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_predict_and_evaluate_bound_a_pass_by_its_largest_work_array(device, dtype, monkeypatch):
    """Unless told, predict and evaluate pass ``inference_batch`` samples at a time: on the CPU as many as
    keep the largest work array (here the 9x9 convolution's columns, 81*784 values a sample) within
    ``inference_bytes``, at least the training batch; 1024 on a GPU. The answers are one pass's."""
    model = nn.Sequential(nn.Conv2D(1, 2, 9, padding=4, activation="relu"), nn.MaxPool2D(2), nn.Flatten(),
                          nn.Dense(392, 3), input_shape=(1, 28, 28), device=device, seed=3, dtype=dtype)
    ops = model.backend
    sample_bytes = 81 * 784 * np.dtype(dtype).itemsize
    bound = 1024 if ops.inference_bytes is None else ops.inference_bytes // sample_bytes
    assert bound == (1024 if device != "cpu" else (66 if dtype == np.float32 else 33))
    assert model.inference_batch() == bound and model.inference_batch(at_least=100) == max(bound, 100)
    assert nn.Sequential(nn.Dense(784, 16), input_shape=(784,), device=device).inference_batch() == 1024
    assert nn.Maxout(784, 16, pieces=3).work_per_sample((784,)) == 48  # every piece's sum
    x = np.random.default_rng(5).standard_normal((150, 1, 28, 28)).astype(dtype)
    y = np.arange(150) % 3
    whole = model.predict(x, batch_size=150)
    passes, forward = [], model._forward
    monkeypatch.setattr(model, "_forward", lambda batch: passes.append(batch.shape[0]) or forward(batch))
    np.testing.assert_allclose(model.predict(x), whole, rtol=1e-5, atol=1e-6)
    trainer = nn.Trainer(model, batch_size=40, quiet=True)
    assert trainer.evaluate(x, y)["accuracy"] == np.mean(whole.argmax(1) == y)
    trainer.batch_size = 100
    trainer.evaluate(x, y)
    def chunks(batch):
        return [min(batch, 150 - begin) for begin in range(0, 150, batch)]
    assert passes == chunks(bound) + chunks(max(bound, 40)) + chunks(max(bound, 100))


def test_dropout_on_images_masks_in_the_image_layout(device):
    """Dropout over (N, C, H, W) drops what its mask says, forward and backward, its mask laid out as the
    images are (batch-last and dense on the CPU), so that its products run in memory order."""
    ops = nn.Sequential(nn.Flatten(), input_shape=(2, 4, 3), device=device).backend
    layer = nn.Dropout(0.4)
    layer.bind(ops, {})
    x = ops.image_array((5, 2, 4, 3), np.float32)
    x[...] = ops.asarray(np.random.default_rng(2).standard_normal((5, 2, 4, 3)).astype(np.float32))
    y = layer.forward(x, training=True)
    mask = host_of(ops, ops.dropout_mask(x.shape, 0.4, layer.seed, layer.counter - 1, x.dtype))
    np.testing.assert_array_equal(host_of(ops, y), host_of(ops, x) * mask)
    np.testing.assert_array_equal(host_of(ops, layer.backward(ops.asarray(np.ones(x.shape, np.float32)))), mask)
    assert (layer._mask.transpose(1, 2, 3, 0) if device == "cpu" else layer._mask).flags.c_contiguous


def host_of(ops, array):
    return np.asarray(ops.to_host(array))


# ----- finite differences in float64 --------------------------------------------------------------------
FD_NETS = {
    "conv-stride-pad": lambda: [nn.Conv2D(2, 3, (3, 2), stride=(2, 1), padding=1, activation="tanh"), nn.Flatten(),
                                nn.Dense(54, 3)],
    "conv-maxpool-overlap": lambda: [nn.Conv2D(2, 2, 3, padding=1, activation="softplus"),
                                     nn.MaxPool2D(3, stride=2, padding=1), nn.Flatten(), nn.Dense(18, 3)],
    "avgpool-batchnorm2d": lambda: [nn.Conv2D(2, 3, 2, activation="sigmoid"), nn.BatchNorm(3),
                                    nn.AvgPool2D(2, stride=1, padding=1), nn.Flatten(), nn.Dense(75, 3)],
    "conv-softmax": lambda: [nn.Conv2D(2, 3, 2, activation="softmax"), nn.Flatten(), nn.Dense(48, 3)],
    "batchnorm1d": lambda: [nn.Flatten(), nn.Dense(50, 4, activation="gelu"), nn.BatchNorm(4), nn.Dense(4, 3)],
    "batchnorm2d-elu": lambda: [nn.Conv2D(2, 3, 2), nn.BatchNorm(3, activation="elu"), nn.Flatten(), nn.Dense(48, 3)],
    "batchnorm1d-silu": lambda: [nn.Flatten(), nn.Dense(50, 4), nn.BatchNorm(4, activation="silu"), nn.Dense(4, 3)],
}


@pytest.mark.parametrize("net", list(FD_NETS))
def test_conv_nets_match_finite_differences(device, net):
    """Every parameter gradient (weights, biases, gamma, beta) and the input gradient, in training mode."""
    rng = np.random.default_rng(7)
    model = nn.Sequential(*FD_NETS[net](), input_shape=(2, 5, 5), device=device, seed=2, dtype=np.float64)
    randomise(model, rng, scale=0.6)
    ops = model.backend
    # distinct inputs far apart, so that no max pool window is near a tie
    x = (rng.permutation(50).reshape(1, 2, 5, 5) * 0.05 - 1.2) * np.array([1.0, -0.7, 1.3])[:, None, None, None]
    labels = ops.asarray(np.array([0, 2, 1]))
    loss = nn.SoftmaxCrossEntropy()
    model.train()

    def loss_of_x(values):
        return float(loss.forward(model.forward(ops.asarray(values)), labels))

    loss_of_x(x)
    dy = loss.backward()
    for layer in reversed(model.layers):
        dy = layer.backward(dy, input_grad=True)
    analytic = {p.name: host(model, p.grad) for p in model.parameters()}
    assert_matches_finite_differences(model, loss_of_x, x, analytic, host(model, dy))


# ----- shapes through the model ---------------------------------------------------------------------------
def lenet(device="cpu", **kwargs):
    return nn.Sequential(
        nn.Conv2D(1, 6, 5, padding=2, activation="relu"), nn.MaxPool2D(2), nn.Conv2D(6, 16, 5, activation="relu"),
        nn.AvgPool2D(2), nn.Flatten(), nn.Dense(400, 120, activation="relu"), nn.BatchNorm(120), nn.Dense(120, 10),
        input_shape=(1, 28, 28), device=device, seed=0, **kwargs)


def test_the_api_of_the_issue(device):
    model = lenet(device)
    assert model.shapes == [(1, 28, 28), (6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5), (400,), (120,), (120,),
                            (10,)]
    assert [tuple(p.shape) for p in model.parameters()] == [(6, 1, 5, 5), (6,), (16, 6, 5, 5), (16,), (400, 120),
                                                             (120,), (120,), (120,), (120, 10), (10,)]
    assert [name for name, _ in model.buffers()] == ["6.running_mean", "6.running_var"]
    x = np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)
    images, flat = model.forward(model.backend.asarray(x)), model.forward(model.backend.asarray(x.reshape(3, 784)))
    assert images.shape == (3, 10) and images.dtype == np.float32
    np.testing.assert_array_equal(host(model, images), host(model, flat))
    printed = []
    summary = model.summary(print_fn=printed.append)
    assert printed == [summary] == [repr(model)]
    for line in ("Conv2D(1, 6, 5, padding=2, activation='relu')  6x28x28", "MaxPool2D(2)", "16x5x5", "BatchNorm(120)",
                 "52,142 parameters and 240 buffer values"):
        assert line in summary, summary
    assert sum(int(np.prod(p.shape)) for p in model.parameters()) == 52142


@pytest.mark.parametrize("layers, message", [
    (lambda: [nn.Conv2D(1, 6, 5), nn.MaxPool2D(2), nn.Conv2D(6, 16, 5), nn.MaxPool2D(2), nn.Dense(400, 120)],
     r"layer 4, Dense\(400, 120\), after layer 3, MaxPool2D\(2\): needs a flat input but gets 16x4x4 values per "
     r"sample: put nn.Flatten\(\) before it \(Dense\(256, ...\) would then fit\)"),
    (lambda: [nn.Conv2D(1, 6, 5, padding=2), nn.MaxPool2D(2), nn.Conv2D(6, 16, 5), nn.MaxPool2D(2), nn.Flatten(),
              nn.Dense(256, 10)],
     r"layer 5, Dense\(256, 10\), after layer 4, Flatten\(\): takes 256 inputs but gets 400: Dense\(400, ...\)"),
    (lambda: [nn.Conv2D(3, 6, 5)], r"takes images of 3 channel\(s\) .* but gets a 1x28x28 input: Conv2D\(1, 6, "
                                   r"\.\.\.\) would fit"),
    (lambda: [nn.Conv2D(1, 6, 29)], r"a 29x29 kernel with padding \(0, 0\) does not fit a 28x28 image: at most 28x28 "
                                    r"with no padding would fit"),
    (lambda: [nn.Conv2D(1, 6, (9, 3), padding=(1, 0)), nn.MaxPool2D(30, padding=(2, 1))],
     r"layer 1, MaxPool2D\(.*\): a 30x30 window does not fit a 22x26 image: at most 26x28 with that padding would fit"),
    (lambda: [nn.Flatten(), nn.BatchNorm(10)], r"BatchNorm\(784\) would fit"),
    (lambda: [nn.Conv2D(1, 4, 3), nn.BatchNorm(4, activation="softmax")],
     r"layer 1, BatchNorm\(4, activation='softmax'\), .*: applies a softmax only over features, not over the "
     r"channels of images"),
    (lambda: [nn.Conv2D(1, 4, 3)], r"the last layer gives 4x26x26 outputs per sample; end with nn.Flatten\(\)"),
])
def test_a_model_that_does_not_chain_says_which_layer_and_what_fits(layers, message):
    with pytest.raises(nn.ConfigError, match=message):
        nn.Sequential(*layers(), input_shape=(1, 28, 28))


def test_input_shape_is_needed_to_start_with_a_convolution():
    with pytest.raises(nn.ConfigError, match=r"needs input_shape=\(channels, height, width\)"):
        nn.Sequential(nn.Conv2D(1, 2, 3), nn.Flatten(), nn.Dense(1352, 2))


def test_same_and_valid_padding_are_pytorchs(device):
    """padding="same" keeps the image's size, as PyTorch's Conv2d(padding="same") computes it (the same
    weights, the same outputs); "valid" is no padding. Both are numbers once made (saved and shown so)."""
    x = np.random.default_rng(0).standard_normal((3, 2, 7, 6)).astype(np.float32)
    for padding, spatial in (("same", (7, 6)), ("valid", (5, 2))):
        conv = nn.Conv2D(2, 3, (3, 5), padding=padding)
        model = nn.Sequential(conv, nn.Flatten(), input_shape=(2, 7, 6), device=device, seed=0)
        assert model.layers[0].output_shape((2, 7, 6)) == (3, *spatial)
        twin = torch.nn.Conv2d(2, 3, (3, 5), padding=padding)
        with torch.no_grad():
            for theirs, ours in zip(twin.parameters(), model.parameters(), strict=True):
                theirs.copy_(torch.from_numpy(host(model, ours.data)))
        np.testing.assert_allclose(model.predict(x), twin(torch.from_numpy(x)).detach().numpy().reshape(3, -1),
                                   **TOL[np.float32])
    assert repr(nn.Conv2D(1, 6, 5, padding="same")) == "Conv2D(1, 6, 5, padding=2)"


def test_bad_inputs_and_options_are_refused_by_name():
    model = lenet()
    with pytest.raises(nn.ShapeError, match=r"x has shape \(2, 1, 27, 28\) but the first layer expects "
                                            r"\(batch, 1, 28, 28\) or \(batch, 784\)"):
        model.forward(np.zeros((2, 1, 27, 28), np.float32))
    for make, message in [(lambda: nn.Conv2D(1, 2, 0), "Conv2D kernel_size"),
                          (lambda: nn.Conv2D(1, 2, 3, stride=(1, 2, 3)), "Conv2D stride must be an int or a pair"),
                          (lambda: nn.MaxPool2D(2, padding=2), "at most half the kernel size"),
                          (lambda: nn.BatchNorm(4, momentum=2), "momentum must be in"),
                          (lambda: nn.RandomShift(-1), "RandomShift max_shift"),
                          (lambda: nn.Conv2D(1, 2, 3, padding="full"),
                           "Conv2D padding must be an int, a pair of ints, 'valid' or 'same', got 'full'"),
                          (lambda: nn.Conv2D(1, 2, 3, stride=2, padding="same"),
                           r"padding 'same' needs stride 1 .* got stride \(2, 2\) and kernel_size \(3, 3\)"),
                          (lambda: nn.Conv2D(1, 2, (3, 4), padding="same"),
                           r"needs stride 1 and an odd kernel_size .* kernel_size \(3, 4\)")]:
        with pytest.raises(nn.ConfigError, match=message):
            make()
    with pytest.raises(nn.ShapeError, match=r"BatchNorm\(120\) needs more than one value per channel"):
        nn.Trainer(model, batch_size=1, quiet=True).fit(np.zeros((1, 784), np.float32), np.zeros(1, int), epochs=1)


@pytest.mark.parametrize("batch, ranks, where", [(64, 1, "in the last step of each epoch over 65 samples"),
                                                 (1, 1, "in every step"),
                                                 (32, 2, "on a rank in the last step of each epoch over 65 samples")])
def test_a_step_of_one_sample_for_a_batchnorm_of_features_is_refused_before_training(batch, ranks, where):
    """65 samples in steps of 64 leave a last step of 1: refused before the first step, not mid-epoch; a
    BatchNorm of images (many values per channel) and a last step of 2 train."""
    x, y = np.zeros((65, 4), np.float32), np.arange(65) % 3
    trainer = nn.Trainer(nn.Sequential(nn.Dense(4, 8), nn.BatchNorm(8), nn.Dense(8, 3)), batch_size=batch, quiet=True)
    with pytest.raises(nn.ShapeError, match=rf"^BatchNorm\(8\) needs more than one value per channel to train, "
                                            rf"but batch size {batch}{' x 2 ranks' if ranks > 1 else ''} gives it 1 "
                                            rf"sample {where}: choose another batch size$"):
        if ranks == 1:
            trainer.fit(x, y)
        else:  # what fit checks once the ranks agree (tests/test_distributed.py runs real ranks)
            trainer._check_batchnorm_steps(x.shape[0], ranks)
    assert trainer.epoch == 0
    nn.Trainer(nn.Sequential(nn.Dense(4, 8), nn.BatchNorm(8), nn.Dense(8, 3)), batch_size=63, quiet=True).fit(x, y)
    images = nn.Sequential(nn.Conv2D(1, 2, 3), nn.BatchNorm(2), nn.Flatten(), nn.Dense(8, 3), input_shape=(1, 4, 4))
    nn.Trainer(images, batch_size=64, quiet=True).fit(np.zeros((65, 16), np.float32), y)


# ----- BatchNorm state and the augmentation ----------------------------------------------------------------
def test_running_statistics_survive_checkpoints_and_resume_bit_for_bit(device, tmp_path):
    x, y = nn.datasets.synthetic(n=150, features=64, classes=3, seed=0)

    def setup():
        model = nn.Sequential(nn.RandomShift(1), nn.Conv2D(1, 3, 3, activation="relu"), nn.BatchNorm(3),
                              nn.MaxPool2D(2), nn.Flatten(), nn.Dropout(0.2), nn.Dense(27, 3), input_shape=(1, 8, 8),
                              device=device, seed=4)
        return model, nn.Trainer(model, optimizer=nn.SGD(lr=0.05, momentum=0.9), batch_size=32, seed=1, quiet=True)

    model, trainer = setup()
    trainer.fit(x, y, epochs=3)
    straight = [host(model, model.flat_params).copy(), host(model, model.flat_buffers).copy()]
    model, trainer = setup()
    trainer.fit(x, y, epochs=1)
    trainer.save_checkpoint(tmp_path / "c.npz")
    model, trainer = setup()
    trainer.load_checkpoint(tmp_path / "c.npz")
    assert host(model, model.flat_buffers).any()
    trainer.fit(x, y, epochs=2)
    np.testing.assert_array_equal(host(model, model.flat_params), straight[0])
    np.testing.assert_array_equal(host(model, model.flat_buffers), straight[1])
    loaded = nn.load(tmp_path / "c.npz", device="cpu")
    assert loaded.input_shape == (1, 8, 8) and isinstance(loaded.layers[2], nn.BatchNorm)


def test_a_batchnorm_activation_is_saved_with_the_model(tmp_path):
    x, y = nn.datasets.synthetic(n=64, features=64, classes=3, seed=0)
    model = nn.Sequential(nn.Conv2D(1, 3, 3), nn.BatchNorm(3, activation=nn.LeakyReLU(0.2)), nn.Flatten(),
                          nn.Dense(108, 3), input_shape=(1, 8, 8), seed=4)
    nn.Trainer(model, batch_size=16, quiet=True).fit(x, y, epochs=1)
    model.save(tmp_path / "m.npz")
    loaded = nn.load(tmp_path / "m.npz")
    assert repr(loaded.layers[1]) == "BatchNorm(3, activation=LeakyReLU(slope=0.2))"
    assert loaded.layers[1].activation.slope == 0.2
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def work_names(layer):
    """The names of a layer's work arrays (on the CPU an image's is kept per batch size: (name, batch))."""
    return {key[0] if isinstance(key, tuple) else key for key in layer._work}


def test_backward_stops_at_the_first_layer_with_weights(device):
    """The layers before the first with weights (the augmentation, a Flatten) learn nothing and the data needs
    no gradient: backward runs none of them, and that layer computes no input gradient (a first
    convolution's col2im is most of its backward); every gradient is the one the whole chain gives."""
    model = nn.Sequential(nn.RandomShift(1), nn.Conv2D(1, 3, 3, padding=1, activation="relu"), nn.MaxPool2D(2),
                          nn.Flatten(), nn.Dense(48, 4), input_shape=(1, 8, 8), device=device, seed=2)
    ops, rng = model.backend, np.random.default_rng(3)
    x, labels = ops.asarray(rng.standard_normal((5, 1, 8, 8)).astype(np.float32)), ops.asarray(rng.integers(0, 4, 5))
    loss = nn.SoftmaxCrossEntropy()
    model.train()
    loss.forward(model.forward(x), labels)
    model.backward(loss.backward())
    grads = host(model, model.flat_grads)
    shift, conv = model[0], model[1]
    assert not {"dx", "dcols"} & work_names(conv) and "dx" not in work_names(shift)
    dy = loss.backward()
    for layer in reversed(model.layers):  # the whole chain, down to the data's gradient
        dy = layer.backward(dy, input_grad=True)
    assert dy.shape == x.shape and "dx" in work_names(shift)
    np.testing.assert_array_equal(grads, host(model, model.flat_grads))


def test_random_shifts_move_images_within_range_and_only_in_training(device):
    model = nn.Sequential(nn.RandomShift(2), nn.Flatten(), input_shape=(1, 9, 9), device=device, seed=0)
    ops = model.backend
    x = np.zeros((200, 1, 9, 9), np.float32)
    x[:, 0, 4, 4] = 1.0  # one lit pixel in the centre of each image
    model.train()
    moved = host(model, model.forward(ops.asarray(x))).reshape(200, 9, 9)
    rows, cols = np.nonzero(moved)[1:]
    assert moved.sum() == 200 and set(rows - 4) == set(cols - 4) == {-2, -1, 0, 1, 2}
    again = host(model, model.forward(ops.asarray(x))).reshape(200, 9, 9)
    assert not np.array_equal(moved, again)  # the next batch draws new shifts
    model.eval()
    np.testing.assert_array_equal(host(model, model.forward(ops.asarray(x))), x.reshape(200, 81))


def test_random_shifts_are_the_same_on_every_device(device):
    def draws(on):
        model = nn.Sequential(nn.RandomShift(2), nn.Flatten(), input_shape=(2, 6, 7), device=on, seed=3).train()
        x = np.random.default_rng(0).standard_normal((5, 2, 6, 7)).astype(np.float32)
        return host(model, model.forward(model.backend.asarray(x)))

    np.testing.assert_array_equal(draws(device), draws("cpu"))


def test_the_shift_backward_is_its_adjoint(device):
    """<shift(x), g> == <x, shift^T(g)>: the backward moves gradients back the way the pixels came."""
    rng = np.random.default_rng(1)
    model = nn.Sequential(nn.RandomShift(2), nn.Flatten(), input_shape=(2, 6, 7), device=device, seed=3,
                          dtype=np.float64).train()
    layer, ops = model.layers[0], model.backend
    x, g = rng.standard_normal((4, 2, 6, 7)), rng.standard_normal((4, 2, 6, 7))
    shifted = host(model, layer.forward(ops.asarray(x), training=True))
    back = host(model, layer.backward(ops.asarray(g)))
    np.testing.assert_allclose((shifted * g).sum(), (x * back).sum(), rtol=1e-12)
