"""Networks from a line of text, as ``nnaccel train --layers`` takes them, and the named presets.

Grammar: comma-separated layers, input to output.

========================  ==========================================================================
``N``                     Dense layer of N units (the hidden activation; the last layer is linear)
``maxoutN[pP]``           Maxout of N units, each the max of P affine pieces (default 2)
``convCkK[sS][pP]``       Conv2D with C filters of K x K (``k5x3``: 5 x 3), stride S, zero padding P
``maxpoolK[sS][pP]``      MaxPool2D, window K x K, stride S (default K), padding P
``avgpoolK[sS][pP]``      AvgPool2D, likewise
``bn``                    BatchNorm over the previous layer's features or channels
``dropR``                 Dropout of rate R, e.g. ``drop0.5``
``shiftM``                RandomShift by up to M pixels (what ``--augment`` puts first)
``flatten``               Flatten; put before the first Dense or Maxout after an image layer when left out
``...:ACT``               a Dense width, ``conv`` or ``bn`` with its own activation: ``conv6k5:linear``,
                          ``bn:relu`` (PyTorch's Conv2d-BatchNorm2d-ReLU), ``128:tanh``; ACT takes a
                          parametrised activation's value as ``--activation`` does: ``128:leaky_relu:0.2``
========================  ==========================================================================

Dense and conv layers take the hidden activation (``--activation``) unless
they name theirs; ``bn`` is linear unless it names one; the output layer is
linear (the loss takes its logits).

A list of yours without image layers starts with the input width when it
has more than one number and the first names no activation (``784,256,10``,
as before); the presets do not. Image layers take one-channel square images, as MNIST's; their
side comes from the data's width. The last Dense width must be the number of
classes.
"""

import math
import re

from . import activations, layers as L
from .errors import ConfigError

PRESETS = {
    "lenet5": "conv6k5p2,maxpool2,conv16k5,maxpool2,120,84,10",
    "lenet5-bn": "conv6k5p2,bn,maxpool2,conv16k5,bn,maxpool2,120,bn,84,10",
    "mlp": "256,10",
    "wide-cnn": "conv64k3p1,conv64k3p1,maxpool2,conv128k3p1,conv128k3p1,maxpool2,512,10",  # VGG-like, for GPUs
    "default": "conv6k5p2,bn,maxpool2,conv16k5,bn,maxpool2,120,bn,84,10",  # nnaccel train's on 28x28 images
}
_NUMBER = r"(\d+(?:x\d+)?)"
_CONV = re.compile(rf"conv(\d+)k{_NUMBER}(?:s{_NUMBER})?(?:p{_NUMBER})?")
_POOL = re.compile(rf"(max|avg)pool{_NUMBER}(?:s{_NUMBER})?(?:p{_NUMBER})?")
_MAXOUT = re.compile(r"maxout(\d+)(?:p(\d+))?")
_GRAMMAR = ("the grammar: N (Dense), maxoutN[pP], convCkK[sS][pP], maxpoolK[sS][pP], avgpoolK[sS][pP], bn, dropR, "
            "shiftM, flatten, and N, conv or bn with :ACTIVATION (see 'nnaccel train --help')")


def _size(text, default=None):
    """``5`` -> 5, ``5x3`` -> (5, 3), None -> default."""
    if text is None:
        return default
    parts = tuple(int(part) for part in text.split("x"))
    return parts[0] if len(parts) == 1 else parts


def _split(token):
    """``"conv6k5:linear"`` -> ``("conv6k5", Linear())``, ``"128:leaky_relu:0.2"`` -> ``("128",
    LeakyReLU(slope=0.2))``; ``"bn"`` -> ``("bn", None)``."""
    name, colon, activation = (part.strip() for part in token.partition(":"))
    if colon and not activation:
        raise ConfigError(f"--layers: {token!r} names no activation after ':'; like {name}:relu")
    try:
        return name, activations.from_text(activation) if activation else None
    except ConfigError as error:
        raise ConfigError(f"--layers: {token!r}: {error}") from None


def _layer(token, shape, activation):
    """The layer a token names (its activation, if it takes one, is ``activation``), given the running
    sample ``shape``; Dense widths are _build's."""
    if token == "bn":
        return L.BatchNorm(shape[0], activation=activation)
    if token == "flatten":
        return L.Flatten()
    if token.startswith("drop"):
        try:
            rate = float(token[4:])
        except ValueError:
            raise ConfigError(f"--layers: {token!r} needs a rate in [0, 1), like drop0.5") from None
        return L.Dropout(rate)  # NaN, infinities and rates outside [0, 1) refused with the range
    if token.startswith("shift"):
        widest = (min(shape[1:]) - 1) // 2 if len(shape) == 3 else None
        if not token[5:].isdecimal() or (widest is not None and int(token[5:]) > widest):
            valid = f"0 to {widest} pixels on {L.describe_shape(shape)} images" if widest is not None else "pixels"
            raise ConfigError(f"--layers: {token!r} needs a whole number of {valid} (below half the side: each "
                              f"image's centre stays in it), like shift2")
        return L.RandomShift(int(token[5:]))
    conv = _CONV.fullmatch(token)
    if conv:
        if len(shape) != 3:  # its input channels would be the flat width, which no image has
            raise ConfigError(f"convolves images (channels, height, width) but gets a {L.describe_shape(shape)} "
                              f"input: image layers go before any flatten and the first Dense width")
        channels, kernel, stride, padding = conv.groups()
        return L.Conv2D(shape[0], int(channels), _size(kernel), _size(stride, 1), _size(padding, 0),
                        activation=activation)
    pool = _POOL.fullmatch(token)
    if pool:
        kind, kernel, stride, padding = pool.groups()
        return (L.MaxPool2D if kind == "max" else L.AvgPool2D)(_size(kernel), _size(stride), _size(padding, 0))
    raise ConfigError(f"--layers: {token!r} is not a layer; {_GRAMMAR}")


def build(text, features, classes, activation="relu"):
    """``(layers, input_shape)`` for the architecture ``text`` (or a preset's name) on data of ``features``
    values per sample and ``classes`` classes; ``activation`` (a name or an Activation) is the hidden one."""
    try:
        return _build(PRESETS.get(text, text), features, classes, activation, text not in PRESETS)
    except ConfigError as error:
        name = f"--model {text}" if text in PRESETS else "--layers"
        raise ConfigError(str(error).replace("--layers", name, 1)) from None


def _build(text, features, classes, activation, starts_with_inputs):
    tokens = [token.strip().lower() for token in text.split(",")]
    if not any(tokens):
        raise ConfigError(f"--layers names no layer; {_GRAMMAR}")
    if "" in tokens:  # a typo that would silently leave a layer out
        raise ConfigError(f"--layers {text!r} has an empty entry (entry {tokens.index('') + 1}): remove the extra "
                          f"comma or name the layer there")
    entries = [_split(token) for token in tokens]
    names = [name for name, _ in entries]
    images = any(name.startswith(("conv", "maxpool", "avgpool", "shift")) for name in names)
    if images:
        side = math.isqrt(features)
        if side * side != features:
            raise ConfigError(f"--layers has image layers but the data's {features} values per sample are not a "
                              f"square image")
        input_shape = (1, side, side)
    else:
        input_shape = (features,)
        bare_first = names[0].isdecimal() and entries[0][1] is None  # 128:tanh is a layer, not inputs
        if starts_with_inputs and len([n for n in names if n.isdecimal()]) > 1 and bare_first:
            if int(names[0]) != features:
                raise ConfigError(f"--layers starts with {names[0]} inputs but the data has {features} features "
                                  f"(a list of Dense widths starts with the input width: {features},"
                                  f"{','.join(tokens)} puts {names[0]} units first)")
            tokens, entries = tokens[1:], entries[1:]
    widths = [index for index, (name, _) in enumerate(entries) if name.isdecimal()]
    if not widths or widths[-1] != len(entries) - 1:
        raise ConfigError(f"--layers must end with the output layer's width ({classes}, the classes)")
    if int(entries[-1][0]) != classes:
        raise ConfigError(f"--layers ends with {entries[-1][0]} outputs but the data has {classes} classes")
    if entries[-1][1] not in (None, activations.Linear()):
        raise ConfigError(f"--layers ends with {tokens[-1]!r}, but the output layer is linear: the loss takes "
                          f"its logits (end with {entries[-1][0]})")
    layers, shape = [], input_shape
    for index, (token, (name, named)) in enumerate(zip(tokens, entries)):
        try:
            own = named or (None if name == "bn" or index == len(tokens) - 1 else activation)
            maxout = _MAXOUT.fullmatch(name)
            if name.isdecimal() or maxout:  # layers of neurons take flat samples
                if len(shape) > 1:
                    layers.append(L.Flatten())
                    shape = layers[-1].output_shape(shape)
                layer = (L.Dense(shape[0], int(name), activation=own) if not maxout else
                         L.Maxout(shape[0], int(maxout[1]), int(maxout[2] or 2)))
            else:
                layer = _layer(name, shape, own)
            if named is not None and not isinstance(layer, L.ACTIVATED):
                raise ConfigError(f"--layers: {token!r}: {name} takes no activation; a Dense width, conv or bn does")
        except ConfigError as error:  # a number out of its range: 0 units, conv0k5, maxpool2s0, drop1.5
            message = str(error)
            raise ConfigError(message if message.startswith("--layers") else
                              f"--layers: {token!r}: {message}") from None
        try:
            shape = layer.output_shape(shape)
        except ConfigError as error:
            raise ConfigError(f"--layers: {token!r} ({layer!r}) after a {L.describe_shape(shape)} output: "
                              f"{error}") from None
        layers.append(layer)
    return layers, input_shape
