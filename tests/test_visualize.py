"""Pictures of what a net learned: the numbers behind them, and each picture command's PNG."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

import nnaccel as nn
from nnaccel import cli, datasets, images, visualize
from command_line import in_process, nnaccel
from tolerances import assert_within, difference_bound, softmax_difference_bound


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A 64-32-10 net trained on the 8x8 digits, saved, and a picture of a digit (dark on light)."""
    x, y = datasets.load_digits("train")
    model = nn.Sequential(nn.Dense(64, 32, activation="relu"), nn.Dense(32, 10), device="cpu", seed=0)
    nn.Trainer(model, optimizer=nn.SGD(lr=0.1, momentum=0.9), batch_size=64, seed=0, quiet=True).fit(x, y, epochs=5)
    folder = tmp_path_factory.mktemp("digits")
    model.save(folder / "digits.npz")
    picture = Image.fromarray(np.round(255 - 255 * x[0].reshape(8, 8)).astype(np.uint8)).resize((80, 80))
    picture.save(folder / "digit.png")
    return model, folder / "digits.npz", folder / "digit.png"


def assert_picture(path, size):
    """A PNG of ``size`` (width, height) pixels with something drawn on it."""
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == size
        grey = np.asarray(picture.convert("L"), dtype=np.float64)
    assert grey.std() > 10, f"{path} looks blank"


def test_softmax_is_stable():
    probs = visualize.softmax([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs[0], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(probs[1], 1 / 3)


def _sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


@pytest.mark.parametrize("outputs, activation, loss, expected", [
    (10, None, None, lambda z: visualize.softmax(z)),
    (10, "softmax", None, lambda p: p),
    (10, "sigmoid", "mse", lambda p: p),
    (10, None, "sigmoid_cross_entropy", _sigmoid),
    (10, None, "mse", lambda p: p),
    (1, None, None, lambda z: np.hstack([1 - _sigmoid(z), _sigmoid(z)])),
    (1, None, "sigmoid_cross_entropy", lambda z: np.hstack([1 - _sigmoid(z), _sigmoid(z)])),
    (1, "sigmoid", "sigmoid_cross_entropy", lambda p: np.hstack([1 - p.astype(np.float64), p])),
    (1, None, "mse", lambda p: np.hstack([1 - p.astype(np.float64), p])),
], ids=["logits", "softmax", "sigmoid", "sigmoid_cross_entropy", "mse", "one logit", "one logit bce",
        "one sigmoid", "one mse"])
def test_probabilities_are_what_the_output_layer_and_the_loss_make_of_the_outputs(outputs, activation, loss,
                                                                                   expected):
    """Logits through the loss's link (softmax, or sigmoid for sigmoid_cross_entropy), an output layer's
    probabilities and mse's estimates as they are; one output is a binary classifier of two columns."""
    x = np.random.default_rng(0).random((6, 5)).astype(np.float32)
    model = nn.Sequential(nn.Dense(5, 8, activation="tanh"), nn.Dense(8, outputs, activation=activation), seed=1)
    probabilities = visualize.predict_proba(model, x, loss)
    np.testing.assert_allclose(probabilities, expected(model.predict(x)), rtol=1e-12, atol=1e-15)
    assert probabilities.shape == (6, max(outputs, 2)) and probabilities.dtype == np.float64


def test_confusion_matrix_and_most_confused():
    cm = visualize.confusion_matrix([0, 0, 1, 1, 1, 2, 2, 2], [0, 1, 1, 2, 2, 2, 0, 1], classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 2], [1, 1, 1]]
    assert visualize.most_confused(cm, k=3) == [(1, 2, 2), (0, 1, 1), (2, 0, 1)]
    assert visualize.most_confused(np.eye(3, dtype=int)) == []
    with pytest.raises(nn.ConfigError, match="y_pred holds labels from 0 to 3"):
        visualize.confusion_matrix([0, 1], [0, 3], classes=3)
    with pytest.raises(nn.ShapeError):
        visualize.confusion_matrix([0, 1], [0], classes=3)


def test_layer_activations_end_in_the_models_output(digits_model):
    model, _, _ = digits_model
    x = datasets.load_digits("test")[0][:1]
    outputs = visualize.layer_activations(model, x[0])
    assert [o.shape for o in outputs] == [(32,), (10,)]
    assert outputs[0].min() >= 0  # ReLU
    np.testing.assert_allclose(outputs[-1], model.predict(x)[0], rtol=1e-6)


@pytest.mark.filterwarnings("error")  # NumPy's overflow warning from a cast to float32 fails the test
@pytest.mark.parametrize("x, message", [
    (np.full(64, 1e39), r"^x has values up to 1e\+39 in size, beyond float32's range"),
    (np.full(64, 2 ** 25 + 1), r"^x has int64 values from 33,554,433 to 33,554,433, but float32 holds integers "
                                r"exactly only up to 16,777,216"),
    (np.ones(64, bool), r"^x has dtype bool but the model computes in float32"),
    (np.array(["0.5"] * 64), r"^x has dtype <U3 but the model computes in float32"),
])
def test_layer_activations_convert_and_refuse_inputs_as_predict_does(digits_model, x, message):
    """layer_activations (show --activations, plot_activations) cast x with numpy.asarray: 1e39 became inf
    with an overflow warning, 2**25 + 1 rounded to 2**25, True became 1.0 and a string was parsed, where
    predict refuses each by name; it converts as predict does now (uint8 pixels, float64 rounded)."""
    model, _, _ = digits_model
    for call in (lambda: visualize.layer_activations(model, x), lambda: model.predict(x[None])):
        with pytest.raises(nn.ShapeError, match=message):
            call()
    pixels = np.arange(64, dtype=np.uint8)
    for given in (pixels, pixels.astype(np.float64), pixels.reshape(8, 8).tolist()):
        np.testing.assert_array_equal(visualize.layer_activations(model, given)[-1], model.predict(pixels[None])[0])


def test_predict_proba_over_many_batches(digits_model):
    """The same rows in the first and the last of several predict batches get the same probabilities,
    within what BLAS guarantees for other batch sizes (it promises no summation order)."""
    model, _, _ = digits_model
    x = np.tile(datasets.load_digits("test")[0], (4, 1))  # more rows than one predict batch
    probs = visualize.predict_proba(model, x)
    bound = softmax_difference_bound(probs[:360], difference_bound(model, x[:360]))
    assert_within(probs[-360:], probs[:360], bound, "probabilities")


def test_show_weights_and_activations(digits_model, tmp_path):
    _, model_path, digit = digits_model
    run = nnaccel("show", model_path, "--weights", tmp_path / "w.png", "--activations", digit,
                  "--out", tmp_path / "a.png", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert_picture(tmp_path / "w.png", (518, 460))  # figure inches x 72 dpi
    assert_picture(tmp_path / "a.png", (691, 244))


def test_evaluate_confusion_and_errors(digits_model, tmp_path, capsys):
    _, model_path, _ = digits_model
    code, out, err = in_process(capsys, "evaluate", model_path, "--data", "digits", "--confusion", tmp_path / "c.png",
                                "--errors", tmp_path / "e.png")
    assert code == 0, err
    assert "test accuracy" in out and "most confused (true -> predicted: count): " in out
    assert_picture(tmp_path / "c.png", (446, 388))
    assert_picture(tmp_path / "e.png", (468, 579))


def test_predict_and_show_name_a_binary_models_class_by_its_sigmoid(digits_model, tmp_path, capsys, monkeypatch):
    """A one-output model trained with sigmoid_cross_entropy predicts class 1 where its logit is above 0,
    with the sigmoid's probability (not a softmax of one column, always 1); show draws its one bar as class
    1's, red where class 1 is predicted, and names the prediction."""
    _, _, digit = digits_model
    x, y = datasets.load_digits("train")
    model = nn.Sequential(nn.Dense(64, 16, activation="relu"), nn.Dense(16, 1), seed=0)
    trainer = nn.Trainer(model, loss="sigmoid_cross_entropy", batch_size=64, seed=0, quiet=True)
    trainer.fit(x, (y == 0).astype(np.float32)[:, None], epochs=2)
    trainer.save_checkpoint(tmp_path / "zero.npz")
    assert cli.main(["predict", str(tmp_path / "zero.npz"), str(digit), "--json", "--device", "cpu"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    p = float(_sigmoid(model.predict(images.prepare_for_model(digit, 64)[None]))[0, 0])
    assert predicted["digit"] == int(p > 0.5) and predicted["top3"] == [[int(p > 0.5), round(max(p, 1 - p), 4)],
                                                                        [int(p <= 0.5), round(min(p, 1 - p), 4)]]
    from matplotlib.axes import Axes

    drawn = []
    for method in ("bar", "set_title"):
        def spy(axis, *args, _original=getattr(Axes, method), _method=method, **kwargs):
            drawn.append((_method, args, kwargs))
            return _original(axis, *args, **kwargs)
        monkeypatch.setattr(Axes, method, spy)
    assert cli.main(["show", str(tmp_path / "zero.npz"), "--activations", str(digit), "--out", str(tmp_path / "a.png"),
                     "--device", "cpu"]) == 0
    assert_picture(tmp_path / "a.png", (691, 244))
    label = round(max(p, 1 - p), 2)
    assert any(m == "set_title" and f"predicted {int(p > 0.5)} (p {label:.2f})" in a[0] for m, a, _ in drawn)
    output_bars = [k["color"] for m, a, k in drawn if m == "bar" and len(a[0]) == 1]
    assert output_bars == [["tab:red" if p > 0.5 else "tab:gray"]]


def test_activations_of_a_model_of_colour_images_draw_each_input_channel(tmp_path, monkeypatch):
    """An input of 3 channels is drawn as 3 tiles, as a convolution's feature maps are (reshaping it to one
    image raised 'cannot reshape array of size 192 into shape (8,8)')."""
    from matplotlib.axes import Axes

    drawn = []
    monkeypatch.setattr(Axes, "imshow", lambda axis, image, *args, _original=Axes.imshow, **kwargs:
                        drawn.append(np.shape(image)) or _original(axis, image, *args, **kwargs))
    model = nn.Sequential(nn.Conv2D(3, 4, 3, activation="relu"), nn.Flatten(), nn.Dense(4 * 6 * 6, 10),
                          input_shape=(3, 8, 8), device="cpu")
    visualize.plot_activations(model, np.random.default_rng(0).random(3 * 8 * 8), tmp_path / "a.png")
    assert drawn[0] == (17, 17)  # 2 x 2 tiles of 8 x 8, a pixel apart
    assert_picture(tmp_path / "a.png", (691, 244))


def test_show_needs_a_picture_to_draw(digits_model):
    _, model_path, digit = digits_model
    for args, message in [((), "show needs --weights"), (("--activations", digit), "go together")]:
        run = nnaccel("show", model_path, *args)
        assert run.returncode == 2 and len(run.stderr.splitlines()) == 1 and message in run.stderr, run.stderr


def test_without_matplotlib_pictures_say_how_to_install_it(digits_model, tmp_path, monkeypatch, capsys):
    model, model_path, digit = digits_model
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(nn.ConfigError, match=r"pip install 'nnaccel\[plot\]'"):
        visualize.plot_confusion(np.eye(3, dtype=int), tmp_path / "c.png")
    assert cli.main(["show", str(model_path), "--weights", str(tmp_path / "w.png")]) == 2
    assert "pip install 'nnaccel[plot]'" in capsys.readouterr().err
    assert cli.main(["predict", str(model_path), str(digit)]) == 0
    assert capsys.readouterr().out.startswith(f"{digit}: ")
    assert not (tmp_path / "w.png").exists()
