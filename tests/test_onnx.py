"""ONNX export against onnxruntime: every layer kind and every activation, on real digits where the MNIST
subset is present (random images otherwise), at several batch sizes (the batch axis is dynamic); the
graph's interface; the errors for a missing onnx package and a missing folder."""

import sys

import numpy as np
import pytest

import nnaccel as nn
from command_line import nnaccel
from conftest import MNIST_SUBSET
from nnaccel.onnx import export

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

IMAGE = (1, 28, 28)
BATCH_SIZES = (1, 7, 64)
TOL = {np.float32: {"rtol": 1e-5, "atol": 1e-5}, np.float64: {"rtol": 1e-10, "atol": 1e-12}}
ACTIVATIONS = [nn.Linear(), nn.ReLU(), nn.LeakyReLU(0.2), nn.ELU(0.5), nn.Sigmoid(), nn.Tanh(), nn.Softplus(),
               nn.GELU(), nn.SiLU(), nn.Softmax()]
ACTIVATION_IDS = [repr(activation) for activation in ACTIVATIONS]


@pytest.fixture(scope="module")
def digits():
    """256 real MNIST digits and labels where the subset is present, else random images in [0, 1]."""
    if MNIST_SUBSET.is_dir():
        x, y = nn.datasets.load_mnist(MNIST_SUBSET)
        return x[:256], y[:256]
    rng = np.random.default_rng(0)
    return rng.random((256, 784), dtype=np.float32), rng.integers(0, 10, 256)


def trained(layers, digits, input_shape=IMAGE, dtype=np.float32):
    """A model trained for an epoch, so that its biases and BatchNorm's running statistics are not trivial."""
    model = nn.Sequential(*layers, input_shape=input_shape, seed=1, dtype=dtype)
    x, y = digits
    nn.Trainer(model, optimizer=nn.SGD(lr=0.05, momentum=0.9), batch_size=32, quiet=True).fit(
        x.astype(dtype), y, epochs=1)
    return model


def assert_onnxruntime_matches_predict(model, x, tmp_path):
    """The exported graph gives ``model.predict``'s outputs at every batch size."""
    path = export(model, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = x.reshape(len(x), *model.input_shape).astype(model.dtype)
    for batch in BATCH_SIZES:
        (logits,) = session.run(["logits"], {"input": x[:batch]})
        assert logits.shape == (batch, model.out_features) and logits.dtype == model.dtype
        np.testing.assert_allclose(logits, model.predict(x[:batch]), **TOL[model.dtype.type],
                                   err_msg=f"batch of {batch}")
    return session


def conv_net(activation, features=IMAGE):
    """Every layer kind: a strided, padded, rectangular convolution, BatchNorm 2d and 1d, both poolings
    (overlapping and padded), Flatten, Dropout, RandomShift and Maxout."""
    convolutions = [nn.RandomShift(2), nn.Conv2D(1, 4, (3, 2), stride=2, padding=1, activation=activation),
                    nn.BatchNorm(4), nn.MaxPool2D(3, stride=2, padding=1), nn.Conv2D(4, 6, 3, activation="relu"),
                    nn.AvgPool2D(3, stride=2, padding=1), nn.MaxPool2D(2), nn.Flatten()]
    width = nn.Sequential(*convolutions, input_shape=features).out_features
    return [*convolutions, nn.Dropout(0.3), nn.Dense(width, 24), nn.BatchNorm(24, activation="tanh"),
            nn.Maxout(24, 12, pieces=3), nn.Dense(12, 10)]


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_dense_nets_match_predict_for_every_activation(activation, digits, tmp_path):
    model = trained([nn.Dense(784, 32, activation=activation), nn.Dense(32, 10, activation=activation)], digits,
                    input_shape=None)
    assert_onnxruntime_matches_predict(model, digits[0], tmp_path)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_conv_nets_with_every_layer_kind_match_predict(activation, digits, tmp_path):
    """Each activation also after a convolution, where softmax runs over the channels of each pixel."""
    model = trained(conv_net(activation), digits)
    bn = model.layers[2]
    assert not np.allclose(bn.buffers["running_mean"], 0) and not np.allclose(bn.buffers["running_var"], 1)
    assert_onnxruntime_matches_predict(model, digits[0], tmp_path)


def test_large_inputs_stay_finite_and_match(digits, tmp_path):
    """Softplus, ELU, sigmoid and softmax far from zero, where a naive formula would overflow."""
    model = trained([nn.Dense(784, 16, activation="softplus"), nn.Dense(16, 16, activation="elu"),
                     nn.Dense(16, 16, activation="sigmoid"), nn.Dense(16, 10, activation="softmax")], digits,
                    input_shape=None)
    assert_onnxruntime_matches_predict(model, digits[0] * 300.0 - 150.0, tmp_path)


def test_float64_models_export_as_double(digits, tmp_path):
    """Layers onnxruntime runs in double on the CPU (it has no double Conv, AveragePool, Erf, Elu or Softplus)."""
    layers = [nn.RandomShift(1), nn.MaxPool2D(2), nn.Flatten(), nn.Dropout(0.2),
              nn.Dense(196, 24, activation="silu"), nn.BatchNorm(24), nn.Maxout(24, 16, pieces=2),
              nn.Dense(16, 12, activation="tanh"), nn.Dense(12, 12, activation="sigmoid"),
              nn.Dense(12, 10, activation="softmax")]
    model = trained(layers, digits, dtype=np.float64)
    session = assert_onnxruntime_matches_predict(model, digits[0], tmp_path)
    assert session.get_inputs()[0].type == "tensor(double)"


def test_a_lenet_trained_on_real_digits_classifies_them_alike(mnist_path, tmp_path):
    x, y = nn.datasets.load_mnist(mnist_path)
    model = trained([nn.Conv2D(1, 4, 5, stride=2, padding=2, activation="relu"), nn.MaxPool2D(2),
                     nn.Conv2D(4, 8, 3, padding=1, activation="relu"), nn.AvgPool2D(2), nn.Flatten(),
                     nn.Dense(72, 32, activation="relu"), nn.BatchNorm(32), nn.Dense(32, 10)], (x[:3000], y[:3000]))
    session = assert_onnxruntime_matches_predict(model, x[-64:], tmp_path)
    held_out = x[-1000:].reshape(-1, *IMAGE)
    (logits,) = session.run(None, {"input": held_out})
    np.testing.assert_array_equal(logits.argmax(axis=1), model.predict(held_out).argmax(axis=1))
    assert (logits.argmax(axis=1) == y[-1000:]).mean() > 0.7  # it did learn the digits


def test_the_graph_takes_input_of_a_dynamic_batch_and_gives_logits(digits, tmp_path):
    model = trained(conv_net("relu"), digits)
    returned = export(model, str(tmp_path / "model.onnx"))
    assert returned == tmp_path / "model.onnx" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    graph = onnx.load(returned).graph
    (given,), (output,) = graph.input, graph.output
    dims = [dim.dim_param or dim.dim_value for dim in given.type.tensor_type.shape.dim]
    assert given.name == "input" and dims == ["batch", *IMAGE]
    assert output.name == "logits" and [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == \
        ["batch", 10]
    assert {node.domain for node in graph.node} == {""}  # standard operators only
    ops = [node.op_type for node in graph.node]
    assert "Dropout" not in ops and ops.count("BatchNormalization") == 2
    (pool,) = [node for node in graph.node if node.op_type == "AveragePool"]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in pool.attribute} == {
        "kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}


def test_a_model_of_identities_still_names_its_output(tmp_path):
    model = nn.Sequential(nn.Dropout(0.5), input_shape=(5,))
    assert_onnxruntime_matches_predict(model, np.random.default_rng(0).standard_normal((64, 5)), tmp_path)


def test_without_the_onnx_package_export_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail
    with pytest.raises(nn.ConfigError, match=r"ONNX export needs the onnx package: pip install 'nnaccel\[onnx\]'"):
        export(nn.Sequential(nn.Dense(4, 2)), tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def test_a_missing_folder_is_named(tmp_path):
    target = tmp_path / "absent" / "model.onnx"
    with pytest.raises(nn.ConfigError, match=r"cannot export to .*model.onnx: folder .*absent does not exist"):
        export(nn.Sequential(nn.Dense(4, 2)), target)
    assert not list(tmp_path.iterdir())


def test_a_file_named_as_the_folder_is_named(tmp_path):
    (tmp_path / "notes").write_text("keep me")
    with pytest.raises(nn.ConfigError, match=r"cannot export to .*model.onnx: .*notes is a file, not a folder"):
        export(nn.Sequential(nn.Dense(4, 2)), tmp_path / "notes" / "model.onnx")
    assert (tmp_path / "notes").read_text() == "keep me"


def test_what_is_not_an_nnaccel_model_is_named(tmp_path):
    """A PyTorch net (also a "Sequential") was an AttributeError: 'Sequential' object has no attribute 'dtype'."""
    torch = pytest.importorskip("torch")
    with pytest.raises(nn.ConfigError, match=r"ONNX export takes an nnaccel Sequential, got a "
                                             r"torch\.nn\.modules\.container\.Sequential"):
        export(torch.nn.Sequential(torch.nn.Linear(3, 2)), tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def test_a_folder_or_a_name_ending_in_a_slash_is_refused_not_written_as_a_file(tmp_path):
    """As the command line refuses them: "out/" once wrote a file named out, and a folder failed at the rename."""
    model = nn.Sequential(nn.Dense(4, 2))
    with pytest.raises(nn.OutputError, match=r"the ONNX file .*out/ names a folder \(it ends in '/'\), and there is "
                                             r"none; to write a file, drop the '/'"):
        export(model, f"{tmp_path}/out/")
    with pytest.raises(nn.OutputError, match=r"the ONNX file .* is a folder; name a file in it, such as "
                                             r".*model.onnx"):
        export(model, tmp_path)
    assert not list(tmp_path.iterdir())


def test_nnaccel_export_from_the_command_line(tmp_path):
    run = nnaccel("train", "--data", "synthetic", "--layers", "784,16,10", "--epochs", "1", "--save", "m.npz",
                  "--quiet", "--device", "cpu", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    run = nnaccel("export", "m.npz", "m.onnx", cwd=tmp_path)
    assert run.returncode == 0 and "output 'logits' [batch, 10]" in run.stdout, run.stderr
    model = nn.load(tmp_path / "m.npz")
    x = np.random.default_rng(0).random((5, 784)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x})[0], model.predict(x), rtol=1e-5, atol=1e-5)
    run = nnaccel("export", "m.npz", "no/such/m.onnx", cwd=tmp_path)
    assert run.returncode == 2 and "folder no/such does not exist" in run.stderr and "Traceback" not in run.stderr


def test_a_model_too_large_for_one_onnx_file_is_refused_by_its_size(monkeypatch, tmp_path):
    """Protobuf holds at most 2 GiB: beyond it the graph cannot even be built (an EncodeError, "Failed to
    serialize proto"), so the weights' size is checked first; here the limit is lowered, not the model grown."""
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", 999)
    model = nn.Sequential(nn.Dense(20, 10), nn.BatchNorm(10))  # 230 parameters and 20 buffer values, in float32
    with pytest.raises(nn.ConfigError, match=r"the model's weights take 1,000 bytes, more than the 999 an ONNX file "
                                             r"holds \(protobuf's 2 GiB limit\)"):
        export(model, tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())
