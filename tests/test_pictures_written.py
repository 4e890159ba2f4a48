"""Pictures are drawn from the right layers and written whole: a failed write leaves an older
picture as it was and names the file; what cannot be drawn names the picture."""

import errno
import os

import numpy as np
import pytest

import nnaccel as nn
from nnaccel import architectures, plotting, visualize
from command_line import nnaccel

HISTORY = {"epoch": [1, 2], "loss": [0.9, 0.5], "accuracy": [0.6, 0.8], "val_loss": [1.0, 0.7],
           "val_accuracy": [0.5, 0.7]}


def test_weights_of_a_model_that_starts_with_batchnorm(tmp_path):
    """BatchNorm has one weight per feature: the picture shows the Dense layer after it, the same
    picture as that Dense layer alone gives."""
    with_norm = nn.Sequential(nn.BatchNorm(784), nn.Dense(784, 10), input_shape=(784,), device="cpu", seed=1)
    alone = nn.Sequential(nn.Dense(784, 10), device="cpu", seed=2)
    alone.layers[0].params["weight"].data[...] = with_norm.layers[1].params["weight"].data
    visualize.plot_weights(with_norm, tmp_path / "norm.png")
    visualize.plot_weights(alone, tmp_path / "alone.png")
    assert (tmp_path / "norm.png").read_bytes() == (tmp_path / "alone.png").read_bytes()
    only_norm = nn.Sequential(nn.BatchNorm(784), input_shape=(784,), device="cpu")
    with pytest.raises(nn.ConfigError, match=f"^cannot draw {tmp_path / 'w.png'}: only the weights of a Dense, "
                                             f"Maxout or Conv2D layer can be drawn, and the model has none$"):
        visualize.plot_weights(only_norm, tmp_path / "w.png")
    assert not (tmp_path / "w.png").exists()


def test_the_weights_title_counts_a_maxouts_units_not_its_pieces(tmp_path, monkeypatch):
    """Maxout(784, 16, pieces=3) has 16 units, drawn as 48 tiles (the title said '48 neurons')."""
    from matplotlib.axes import Axes

    titles = []
    monkeypatch.setattr(Axes, "set_title", lambda axis, text, *args, **kwargs: titles.append(text))
    visualize.plot_weights(nn.Sequential(nn.Maxout(784, 16, pieces=3), nn.Dense(16, 10), device="cpu"),
                           tmp_path / "w.png")
    assert titles == ["first-layer weights of 16 Maxout units x 3 pieces, as 28x28 images"]


def test_weights_after_a_pool_are_drawn_as_the_image_it_made(tmp_path, monkeypatch):
    """A Dense layer after a 2x1 max pool of 28x28 images takes 14x28 images: its weights are tiles of that
    (it refused: 'cannot draw ...: 392 inputs do not make a square image')."""
    from matplotlib.axes import Axes

    titles = []
    monkeypatch.setattr(Axes, "set_title", lambda axis, text, *args, **kwargs: titles.append(text))
    layers, shape = architectures.build("maxpool2x1,10", 784, 10)
    visualize.plot_weights(nn.Sequential(*layers, input_shape=shape, device="cpu"), tmp_path / "w.png")
    assert titles == ["first-layer weights of 10 neurons, as 14x28 images"]


@pytest.mark.parametrize("flatten", [False, True], ids=["dropout", "flatten"])
def test_softmax_before_a_trailing_dropout_is_not_applied_twice(flatten):
    """Nor before a trailing Flatten, as of a convolution of one pixel per class (a second softmax made
    probabilities near 0.1 each)."""
    model = (nn.Sequential(nn.Conv2D(1, 10, 8, activation="softmax"), nn.Flatten(), input_shape=(1, 8, 8),
                           device="cpu", seed=0) if flatten else
             nn.Sequential(nn.Dense(64, 10, activation="softmax"), nn.Dropout(0.2), device="cpu", seed=0))
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    probabilities = visualize.predict_proba(model, x)
    np.testing.assert_allclose(probabilities, model.predict(x), rtol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-6)


def test_activations_of_a_convolution_before_a_trailing_flatten_name_the_prediction(tmp_path, monkeypatch):
    """The output layer is the convolution: its maps are the outputs, drawn as a bar per class with the
    prediction (they were drawn as maps, and no panel named the prediction)."""
    from matplotlib.axes import Axes

    titles = []
    monkeypatch.setattr(Axes, "set_title", lambda axis, text, *args, **kwargs: titles.append(text))
    model = nn.Sequential(nn.Conv2D(1, 10, 8), nn.Flatten(), input_shape=(1, 8, 8), device="cpu", seed=0)
    x = np.random.default_rng(0).random(64, dtype=np.float32)
    visualize.plot_activations(model, x, tmp_path / "a.png")
    predicted = int(model.predict(x[None])[0].argmax())
    assert titles[1:] == [f"layer 0: Conv2D 10 linear\npredicted {predicted} "
                          f"(p {visualize.predict_proba(model, x[None])[0, predicted]:.2f})"]


def test_activations_of_a_model_without_parameters_are_its_input(tmp_path):
    """A model of a Flatten alone has no layer to draw a panel for: the picture is the input alone (a figure
    of one panel raised TypeError: 'Axes' object is not subscriptable)."""
    model = nn.Sequential(nn.Flatten(), input_shape=(1, 8, 8), device="cpu")
    visualize.plot_activations(model, np.random.default_rng(0).random(64), tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_leave_out_a_validation_no_epoch_had(tmp_path, monkeypatch):
    """A run without validation data has NaN in every val_ value: no 'validation' line or legend entry
    (one was drawn with no point on it)."""
    from matplotlib.axes import Axes

    labels = []
    monkeypatch.setattr(Axes, "plot", lambda axis, *args, _original=Axes.plot, **kwargs:
                        labels.append(kwargs.get("label")) or _original(axis, *args, **kwargs))
    nan = float("nan")
    plotting.plot_history({**HISTORY, "val_loss": [nan, nan], "val_accuracy": [nan, 0.7]}, tmp_path / "c.png")
    assert labels == ["training", "training", "validation"]


def test_activations_leave_out_a_shift_as_its_input_passes_through_at_inference(tmp_path, monkeypatch):
    """The default recipe starts with a RandomShift: at inference its output is the input, drawn already
    (it had a panel of its own, '1 maps of 28x28')."""
    from matplotlib.axes import Axes

    titles = []
    monkeypatch.setattr(Axes, "set_title", lambda axis, text, *args, **kwargs: titles.append(text))
    layers, shape = architectures.build("shift2,conv2k5,10", 784, 10)
    visualize.plot_activations(nn.Sequential(*layers, input_shape=shape, device="cpu"),
                               np.random.default_rng(0).random(784), tmp_path / "a.png")
    assert [title.split("\n")[0] for title in titles] == ["input, as the model sees it", "layer 1: Conv2D",
                                                          "layer 3: Dense 10 linear"]


def test_titles_count_one_map_or_neuron_in_the_singular(tmp_path, monkeypatch):
    """'1 map of 14x14', '1 neuron' (were '1 maps', '1 neurons')."""
    from matplotlib.axes import Axes

    titles = []
    monkeypatch.setattr(Axes, "set_title", lambda axis, text, *args, **kwargs: titles.append(text))
    layers, shape = architectures.build("maxpool2,10", 784, 10)
    model = nn.Sequential(*layers, input_shape=shape, device="cpu")
    visualize.plot_activations(model, np.random.default_rng(0).random(784), tmp_path / "a.png")
    visualize.plot_weights(nn.Sequential(nn.Dense(784, 1), nn.Dense(1, 2), device="cpu"), tmp_path / "w.png")
    assert "layer 0: MaxPool2D\n1 map of 14x14" in titles
    assert "first-layer weights of 1 neuron, as 28x28 images" in titles


def test_the_output_panel_labels_at_most_20_classes(tmp_path, monkeypatch):
    """10 outputs: every class labelled; 40: every second (the labels of 40 overlapped)."""
    from matplotlib.axes import Axes

    ticks = []
    monkeypatch.setattr(Axes, "set_xticks", lambda axis, places, labels=None, **kwargs:
                        ticks.append((list(places), labels)))
    for outputs in (10, 40):
        model = nn.Sequential(nn.Dense(784, 16, activation="relu"), nn.Dense(16, outputs), device="cpu")
        visualize.plot_activations(model, np.random.default_rng(0).random(784), tmp_path / "a.png")
    assert ticks[0] == (list(range(10)), [str(c) for c in range(10)])
    assert ticks[1] == (list(range(0, 40, 2)), [str(c) for c in range(0, 40, 2)])


def test_weights_after_a_flatten_of_channels_are_drawn_as_the_image_averaged_over_them(tmp_path, monkeypatch):
    """A Dense after the flatten of a 3-channel 8x8 input: one 8x8 tile per neuron, the mean over the channels,
    as a convolution's filters are drawn (it was refused: '192 inputs do not make a square image')."""
    from matplotlib.axes import Axes

    titles, tiles = [], []
    monkeypatch.setattr(Axes, "set_title", lambda axis, text, *args, **kwargs: titles.append(text))
    monkeypatch.setattr(visualize, "_mosaic", lambda given, gap, _original=visualize._mosaic:
                        tiles.extend(given) or _original(given, gap))
    model = nn.Sequential(nn.Flatten(), nn.Dense(192, 4), input_shape=(3, 8, 8), device="cpu")
    visualize.plot_weights(model, tmp_path / "w.png")
    assert titles == ["first-layer weights of 4 neurons, as 8x8 images, the mean over 3 input channels"]
    weight = model.layers[1].params["weight"].data
    expected = weight.reshape(3, 8, 8, 4)[..., 2].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(tiles[2], expected, rtol=1e-12)


class FullDisk:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, handle, room):
        self.handle, self.room = handle, room

    def write(self, data):
        if len(data) > self.room:
            self.handle.write(bytes(data[:self.room]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


DRAWINGS = {
    "weights png": (lambda path: visualize.plot_weights(nn.Sequential(nn.Dense(64, 10), device="cpu"), path), "png"),
    "confusion svg": (lambda path: visualize.plot_confusion(np.eye(3, dtype=int), path), "svg"),
    "history png": (lambda path: plotting.plot_history(HISTORY, path), "png"),
}


@pytest.mark.parametrize("name", DRAWINGS)
def test_full_disk_leaves_the_old_picture_whole(tmp_path, monkeypatch, name):
    draw, suffix = DRAWINGS[name]
    path = tmp_path / f"picture.{suffix}"
    draw(path)
    before = path.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *args, **kwargs: FullDisk(real_fdopen(fd, *args, **kwargs), 100))
    with pytest.raises(nn.OutputError, match=f"^cannot write {path}: No space left on device; the previous file "
                                             f"is intact$"):
        draw(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left


@pytest.mark.parametrize("suffix,start", [(".svg", b"<?xml"), (".pdf", b"%PDF"), (".jpg", b"\xff\xd8\xff")])
def test_pictures_are_written_in_the_format_their_name_says(tmp_path, suffix, start):
    plotting.plot_history(HISTORY, tmp_path / f"curves{suffix}")
    visualize.plot_confusion(np.eye(3, dtype=int), tmp_path / f"confusion{suffix}")
    assert (tmp_path / f"curves{suffix}").read_bytes().startswith(start)
    assert (tmp_path / f"confusion{suffix}").read_bytes().startswith(start)


def test_a_picture_named_without_an_extension_is_a_png_as_matplotlib_names_it(tmp_path):
    plotting.plot_history(HISTORY, tmp_path / "curves")
    visualize.plot_confusion(np.eye(3, dtype=int), str(tmp_path / "confusion"))
    assert sorted(os.listdir(tmp_path)) == ["confusion.png", "curves.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in tmp_path.iterdir())


def test_a_picture_written_through_a_symbolic_link_keeps_the_link(tmp_path):
    (tmp_path / "real.png").write_bytes(b"old")
    (tmp_path / "link.png").symlink_to("real.png")
    plotting.plot_history(HISTORY, tmp_path / "link.png")
    assert (tmp_path / "link.png").is_symlink() and (tmp_path / "real.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(os.listdir(tmp_path)) == ["link.png", "real.png"]


def test_errors_of_images_that_are_not_square_name_the_picture(tmp_path):
    """20x30 images make 600 inputs, which ``--errors`` cannot lay out as square tiles."""
    rng = np.random.default_rng(0)
    x = rng.random((20, 600), dtype=np.float32)
    probs = visualize.softmax(rng.normal(size=(20, 10)))
    with pytest.raises(nn.ShapeError, match=f"^cannot draw {tmp_path / 'e.png'}: 600 inputs do not make a square "
                                            f"image$"):
        visualize.plot_errors(x, np.arange(20) % 10, probs, tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()
    np.savez(tmp_path / "wide.npz", x_train=rng.integers(0, 256, (40, 20, 30), dtype=np.uint8),
             y_train=np.arange(40, dtype=np.uint8) % 10, x_test=rng.integers(0, 256, (20, 20, 30), dtype=np.uint8),
             y_test=np.arange(20, dtype=np.uint8) % 10)
    nn.Sequential(nn.Dense(600, 10), device="cpu").save(tmp_path / "wide_model.npz")
    run = nnaccel("evaluate", "wide_model.npz", "--data", "wide.npz", "--errors", "e.png", "--confusion", "c.png",
                  cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr == "nnaccel evaluate: error: cannot draw e.png: 600 inputs do not make a square image\n"
    assert not (tmp_path / "e.png").exists() and not (tmp_path / "c.png").exists()
