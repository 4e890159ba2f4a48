"""Pictures of what a digit net learned and where it goes wrong.

The first layer's weights as images, every layer's activations for one
input, the confusion matrix and the worst-classified images. Drawing needs
matplotlib (pip install 'nnaccel[plot]'); the numbers (probabilities,
activations, confusion matrix) do not.
"""

import io
import math

import numpy

from . import losses
from .checkpoint import atomic_write
from .errors import ConfigError, ShapeError
from .layers import Conv2D, Dense, Flatten, Maxout, RandomLayer
from .plotting import picture_path, pyplot, save_figure


def softmax(logits):
    """Row-wise probabilities from logits, without overflow for any magnitude."""
    shifted = numpy.asarray(logits, dtype=numpy.float64)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    exp = numpy.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def sigmoid(logits):
    """Element-wise probabilities from logits, without overflow for any magnitude."""
    return 0.5 + 0.5 * numpy.tanh(0.5 * numpy.asarray(logits, dtype=numpy.float64))


def predict_proba(model, x, loss=None):
    """Class probabilities for the rows of ``x``, one column per class, from the outputs of ``model``
    trained with ``loss`` (a name or a Loss; by default softmax cross-entropy, whose outputs are logits)."""
    return _as_probabilities(model, model.predict(x), loss)


def _as_probabilities(model, outputs, loss=None):
    """A model's outputs as class probabilities. Those of an output layer with a softmax or a sigmoid are
    probabilities already, and those of a model trained with mse its estimates of the one-hot targets:
    they stay as they are; logits go through the sigmoid for sigmoid_cross_entropy (a probability per
    class, as in multi-label training) or else the softmax. One output is a binary classifier: its
    probability ``p`` of class 1 (a logit through the sigmoid) gives the two columns ``1 - p`` and ``p``."""
    outputs = numpy.asarray(outputs, dtype=numpy.float64)
    activation = getattr(getattr(_output_layer(model), "activation", None), "name", None)
    trained_with = losses.get(loss).name
    if activation == "softmax":
        return outputs
    if activation == "sigmoid" or trained_with == "mse":
        probabilities = outputs
    elif trained_with == "sigmoid_cross_entropy" or outputs.shape[-1] == 1:
        probabilities = sigmoid(outputs)
    else:
        return softmax(outputs)
    return numpy.concatenate([1 - probabilities, probabilities], axis=-1) if outputs.shape[-1] == 1 else probabilities


def _output_layer(model):
    """The last layer that changes values at inference: the Flatten, Dropout or RandomShift after it pass
    them on."""
    return next((layer for layer in reversed(model.layers) if not isinstance(layer, (Flatten, RandomLayer))), None)


def layer_activations(model, x):
    """The output of every layer for one input ``x`` of ``model.in_features`` values, on the host.

    The layers run one by one on the model's device, in inference mode; ``x`` is converted and refused
    as ``predict`` converts and refuses it.
    """
    with model.backend.activate():  # on cuda:1, GPU 1
        x = model._on_device(x)
        if x.size != model.in_features:
            raise ShapeError(f"x has {x.size} values but the model takes {model.in_features} inputs")
        values = model.check_input(x.reshape((1,) + model.input_shape))
        return [numpy.array(model.backend.to_host(layer.in_dtype(values, model.dtype, "output"))[0])  # a copy
                for layer, values in zip(model.layers, model._layer_outputs(values, training=False))]


def confusion_matrix(y_true, y_pred, classes):
    """``cm[t, p]``: how many samples of class ``t`` were predicted as ``p``."""
    y_true, y_pred = numpy.asarray(y_true), numpy.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ShapeError(f"y_true and y_pred must be 1-D and alike, got shapes {y_true.shape} and {y_pred.shape}")
    for name, labels in (("y_true", y_true), ("y_pred", y_pred)):
        if labels.dtype.kind not in "iu":
            raise ShapeError(f"{name} has dtype {labels.dtype}; expected integer labels")
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise ConfigError(f"{name} holds labels from {labels.min()} to {labels.max()}, "
                              f"expected 0..{classes - 1}")
    counts = numpy.bincount(y_true * classes + y_pred, minlength=classes * classes)
    return counts.reshape(classes, classes)


def most_confused(cm, k=5):
    """The ``k`` most frequent mistakes as ``(true, predicted, count)``, most frequent first."""
    mistakes = numpy.array(cm)
    numpy.fill_diagonal(mistakes, 0)
    order = numpy.argsort(-mistakes, axis=None, kind="stable")[:k]
    pairs = zip(*numpy.unravel_index(order, mistakes.shape))
    return [(int(t), int(p), int(mistakes[t, p])) for t, p in pairs if mistakes[t, p] > 0]


def _mosaic(tiles, gap=2):
    """2-D tiles of one shape in a near-square grid, ``gap`` NaN pixels apart (drawn blank)."""
    height, width = tiles[0].shape
    rows, cols = _grid(len(tiles))
    mosaic = numpy.full((rows * (height + gap) - gap, cols * (width + gap) - gap), numpy.nan)
    for index, tile in enumerate(tiles):
        top, left = divmod(index, cols)
        row, col = top * (height + gap), left * (width + gap)
        mosaic[row:row + height, col:col + width] = tile
    return mosaic


def plot_weights(model, path):
    """The first layer's weights as a PNG: for a Dense layer one tile per hidden neuron, shaped like the
    input image (a Maxout's, one per piece of each unit); for a Conv2D layer one tile per filter (averaged
    over its input channels).

    Red pixels push the neuron up, blue ones down. All tiles share one colour
    scale (clipped at the 99.5th percentile of the weights' size), so neurons
    that learned little look faint.
    """
    # not BatchNorm's: one weight per feature is no picture of the input
    layer = next((layer for layer in model.layers if isinstance(layer, (Dense, Maxout, Conv2D))), None)
    if layer is None:
        raise ConfigError(f"cannot draw {path}: only the weights of a Dense, Maxout or Conv2D layer can be "
                          f"drawn, and the model has none")
    weights = numpy.asarray(model.backend.to_host(layer.params["weight"].data), dtype=numpy.float64)
    if isinstance(layer, Conv2D):
        tiles = list(weights.mean(axis=1))
        title = (f"first-layer filters: {len(tiles)} of {layer.kernel_size[0]}x{layer.kernel_size[1]}"
                 + (f", the mean over {layer.in_channels} input channels" if layer.in_channels > 1 else ""))
    else:
        channels, height, width = _tile_shape(model, layer, path)
        weights = weights.reshape(layer.in_features, -1)
        tiles = [column.reshape(channels, height, width).mean(axis=0) for column in weights.T]
        units = (f"{layer.out_features} Maxout units x {layer.pieces} pieces"
                 if isinstance(layer, Maxout) else f"{len(tiles)} neuron{'s' * (len(tiles) != 1)}")
        title = (f"first-layer weights of {units}, as {height}x{width} images"
                 + (f", the mean over {channels} input channels" if channels > 1 else ""))
    limit = float(numpy.percentile(numpy.abs(weights), 99.5)) or 1.0
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.2, 6.4))
    image = axis.imshow(_mosaic(tiles, gap=1 if isinstance(layer, Conv2D) else 2), cmap="RdBu_r", vmin=-limit,
                        vmax=limit, interpolation="nearest")
    axis.axis("off")
    figure.colorbar(image, ax=axis, shrink=0.6, label="weight")
    axis.set_title(title)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def plot_activations(model, x, path, loss=None):
    """Every layer's activations for one input as a PNG: the input image (a tile per channel), then one
    panel per layer.

    Convolution and pooling outputs are drawn as their feature maps, one tile
    per channel; layers wider than 32 as a grid of cells, narrower ones and
    the output layer as bars. Layers that only reshape or pass their input
    through at inference (Flatten, Dropout, RandomShift) get no panel. The
    prediction's probability is ``predict_proba``'s for a model trained with ``loss``.
    """
    outputs = layer_activations(model, x)
    probabilities = _as_probabilities(model, outputs[-1], loss)
    panels = [(index, layer, values) for index, (layer, values) in enumerate(zip(model.layers, outputs))
              if layer.params or values.ndim == 3 and not isinstance(layer, RandomLayer)]
    plt = pyplot()
    figure, (axes,) = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.4), squeeze=False,
                                   gridspec_kw={"width_ratios": [1] * len(panels) + [1.4]})  # a row, even of one
    shape = model.input_shape if len(model.input_shape) == 3 else (1,) + (_image_side(model.in_features, path),) * 2
    axes[0].imshow(_mosaic(list(numpy.asarray(x).reshape(shape)), gap=1), cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("input, as the model sees it" + (f"\n{shape[0]} channels" if shape[0] > 1 else ""))
    axes[0].axis("off")
    for axis, (index, layer, values) in zip(axes[1:], panels):
        title = f"layer {index}: {type(layer).__name__} {values.size} {layer.config().get('activation', '')}".rstrip()
        if layer is _output_layer(model):  # a convolution's maps too, when only a Flatten follows
            values = values.ravel()
            predicted = int(probabilities.argmax())
            classes = list(range(values.size)) if values.size > 1 else [1]  # one output: class 1's score
            colours = ["tab:red" if c == predicted else "tab:gray" for c in classes]
            axis.bar(range(values.size), values, color=colours)
            every = -(-values.size // 20)  # at most 20 labels: more overlap in a panel this wide
            axis.set_xticks(range(0, values.size, every), [str(c) for c in classes[::every]])
            axis.set_xlabel("class")
            axis.set_ylabel("output")
            axis.set_title(f"{title}\npredicted {predicted} (p {probabilities[predicted]:.2f})")
        elif values.ndim == 3:
            image = axis.imshow(_mosaic(list(values), gap=1), cmap="magma", interpolation="nearest")
            axis.axis("off")
            figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
            maps = values.shape[0]
            axis.set_title(f"layer {index}: {type(layer).__name__}\n{maps} map{'s' * (maps != 1)} of "
                           f"{values.shape[1]}x{values.shape[2]}")
        elif values.size <= 32:
            axis.bar(range(values.size), values, color="tab:blue")
            axis.set_xlabel("neuron")
            axis.set_title(title)
        else:
            rows, cols = _grid(values.size)
            cells = numpy.full(rows * cols, numpy.nan)
            cells[:values.size] = values
            image = axis.imshow(cells.reshape(rows, cols), cmap="magma")
            axis.axis("off")
            figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
            axis.set_title(f"{title}\n{int((values > 0).sum())} above zero")
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def plot_confusion(cm, path):
    """The confusion matrix as a PNG: counts in the cells, colour = share of the true class."""
    cm = numpy.asarray(cm)
    classes = cm.shape[0]
    shares = cm / numpy.maximum(cm.sum(axis=1, keepdims=True), 1)
    plt = pyplot()
    from matplotlib.colors import PowerNorm

    figure, axis = plt.subplots(figsize=(6.2, 5.4))
    image = axis.imshow(shares, cmap="Blues", norm=PowerNorm(gamma=0.4, vmin=0, vmax=1))
    for t in range(classes):
        for p in range(classes):
            if cm[t, p]:
                axis.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=8,
                          color="white" if shares[t, p] > 0.4 else "black")
    axis.set_xticks(range(classes))
    axis.set_yticks(range(classes))
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    total = cm.sum()
    axis.set_title(f"confusion matrix: {numpy.trace(cm)} of {total} right ({numpy.trace(cm) / max(total, 1):.1%})")
    figure.colorbar(image, ax=axis, label="share of the true class")
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def plot_errors(x, y_true, probs, path, count=25):
    """The ``count`` images with the lowest probability of their true class, as a PNG grid.

    Each tile gives the true class and the predicted one with their
    probabilities; red titles are mistakes.
    """
    x, y_true, probs = numpy.asarray(x), numpy.asarray(y_true), numpy.asarray(probs)
    if not len(x) == len(y_true) == len(probs):
        raise ShapeError(f"x, y_true and probs hold {len(x)}, {len(y_true)} and {len(probs)} samples")
    true_probability = probs[numpy.arange(len(y_true)), y_true]
    worst = numpy.argsort(true_probability, kind="stable")[:count]
    side = _image_side(x.shape[1], path)
    rows, cols = _grid(len(worst))
    plt = pyplot()
    figure, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.55 + 0.3), squeeze=False,
                                layout="constrained")
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, worst):
        predicted = int(probs[index].argmax())
        axis.imshow(x[index].reshape(side, side), cmap="gray_r", vmin=0, vmax=1)
        axis.set_title(f"true {y_true[index]}: {true_probability[index]:.2f}\n"
                       f"pred {predicted}: {probs[index, predicted]:.2f}", fontsize=9,
                       color="tab:red" if predicted != y_true[index] else "black")
    figure.suptitle(f"the {len(worst)} images given the lowest probability of their true class")
    _save(figure, path)
    plt.close(figure)


def _save(figure, path):
    """Write ``figure`` to ``path``, whole or not at all (``save_figure``); a PNG gets a 256-colour
    palette, a fraction of the size.

    A colour map has 256 colours, so the weights' noise costs a byte a pixel
    instead of three. Pillow is there: matplotlib needs it.
    """
    path = picture_path(path)
    if path.suffix.lower() != ".png":
        save_figure(figure, path, dpi=72)
        return
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=72)
    with Image.open(buffer) as picture:
        palette = picture.convert("RGB").quantize(256)
    atomic_write(path, lambda handle: palette.save(handle, format="PNG", optimize=True))


def _tile_shape(model, layer, path):
    """(channels, height, width) of a picture of ``layer``'s weights: the image its inputs were flattened
    from (pooled 14x28, say; of 3 channels), else the square its inputs make."""
    index = next(index for index, other in enumerate(model.layers) if other is layer)
    image = next((shape for shape in reversed(model.shapes[:index + 1]) if len(shape) == 3), None)
    if image is not None and math.prod(image) == layer.in_features:
        return image
    side = _image_side(layer.in_features, path)
    return 1, side, side


def _image_side(features, path):
    """The side of the square image that ``features`` inputs make, or a ShapeError naming the
    picture ``path`` that needs it."""
    side = math.isqrt(features)
    if side * side != features:
        raise ShapeError(f"cannot draw {path}: {features} inputs do not make a square image")
    return side


def _grid(count):
    """(rows, columns) of a near-square grid holding ``count`` cells."""
    cols = math.ceil(math.sqrt(count))
    return math.ceil(count / cols), cols
