"""PyTorch weights in and out: ``to_torch`` builds the ``torch.nn.Sequential`` that computes what a model
computes, with its weights and running statistics copied; ``from_torch`` builds the nnaccel model of such
a Sequential. So a net trained here can be fine-tuned, inspected or deployed with PyTorch's tools, and a
net trained there can be trained on or served with nnaccel.

PyTorch is not a dependency of nnaccel: it is imported when one of these is called.

The layouts differ in one place only: a Dense weight is (in, out), a Linear weight (out, in). An
activation is part of a Dense, Conv2D or BatchNorm layer here and a module of its own there, so in
``from_torch`` an activation module must directly follow a Linear, Conv2d or BatchNorm (Conv2d-BatchNorm2d-ReLU
becomes ``Conv2D``, ``BatchNorm(activation="relu")``).
"""

from typing import NamedTuple

import numpy

from . import activations, layers
from .errors import ConfigError
from .layers import describe_shape
from .model import Sequential

# nnaccel activation -> (torch.nn module, {nnaccel parameter: torch attribute}, {torch attribute: the value
# nnaccel's arithmetic means}); "linear" is no module at all.
TORCH_ACTIVATIONS = {
    "relu": ("ReLU", {}, {}),
    "leaky_relu": ("LeakyReLU", {"slope": "negative_slope"}, {}),
    "elu": ("ELU", {"alpha": "alpha"}, {}),
    "sigmoid": ("Sigmoid", {}, {}),
    "tanh": ("Tanh", {}, {}),
    "softplus": ("Softplus", {}, {"beta": 1.0, "threshold": 20.0}),
    "gelu": ("GELU", {}, {"approximate": "none"}),
    "silu": ("SiLU", {}, {}),
    "softmax": ("Softmax", {}, {"dim": 1}),
}
ACTIVATION_OF_MODULE = {module: name for name, (module, _, _) in TORCH_ACTIVATIONS.items()}


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ConfigError("converting to or from PyTorch needs PyTorch: pip install torch") from None
    return torch


# ----- nnaccel -> torch -------------------------------------------------------------------------------------
def _activation_modules(torch, activation):
    """The torch module of an nnaccel activation, as a list: empty for linear."""
    if activation.name == "linear":
        return []
    module, params, fixed = TORCH_ACTIVATIONS[activation.name]
    config = activation.config()
    return [getattr(torch.nn, module)(**{attribute: config[name] for name, attribute in params.items()}, **fixed)]


def _torch_layer(torch, layer, input_shape, dtype):
    """The torch module of one nnaccel layer (without its activation), or None where there is none to make
    (a subclass of a layer may compute something else: it has none)."""
    kind = type(layer)
    if kind is layers.Dense:
        return torch.nn.Linear(layer.in_features, layer.out_features, dtype=dtype)
    if kind is layers.Conv2D:
        return torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                               dtype=dtype)
    if kind is layers.BatchNorm:
        norm = torch.nn.BatchNorm2d if len(input_shape) == 3 else torch.nn.BatchNorm1d
        return norm(layer.num_features, eps=layer.eps, momentum=layer.momentum, dtype=dtype)
    if kind is layers.MaxPool2D:
        return torch.nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
    if kind is layers.AvgPool2D:
        return torch.nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding, count_include_pad=True)
    if kind is layers.Flatten:
        return torch.nn.Flatten()
    if kind is layers.Dropout:
        return torch.nn.Dropout(layer.rate)
    if kind is layers.RandomShift:
        return None  # augmentation: the identity at inference
    raise ConfigError(f"{layer!r} has no PyTorch equivalent")


def to_torch(model):
    """A ``torch.nn.Sequential`` (on the CPU, in the model's dtype and mode, training or eval) computing what
    ``model`` computes: the same outputs in eval mode and the same gradients in training mode, except that
    its Dropout draws other masks and RandomShift, augmentation only, is left out. Maxout, which PyTorch
    has no module for, is a ConfigError."""
    torch = _import_torch()
    dtype = getattr(torch, model.dtype.name)
    modules = []
    for index, (layer, input_shape) in enumerate(zip(model.layers, model.shapes)):
        try:
            module = _torch_layer(torch, layer, input_shape, dtype)
        except ConfigError as error:
            raise ConfigError(f"cannot convert layer {index} to PyTorch: {error}") from None
        if module is None:
            continue
        with torch.no_grad():
            for name, parameter in layer.params.items():
                value = model.backend.to_host(parameter.data)
                getattr(module, name).copy_(torch.from_numpy(value.T if isinstance(layer, layers.Dense) else value))
            for name, buffer in layer.buffers.items():
                getattr(module, name).copy_(torch.from_numpy(model.backend.to_host(buffer)))
        modules += [module, *_activation_modules(torch, getattr(layer, "activation", activations.Linear()))]
    return torch.nn.Sequential(*modules).train(model.training)


# ----- torch -> nnaccel -------------------------------------------------------------------------------------
class _Spec(NamedTuple):
    """One nnaccel layer to build from a torch module."""

    cls: type
    options: dict
    params: dict
    buffers: dict
    source: object  # the torch module
    index: int = 0  # its place in the Sequential (a module may be in several)


def _require(module, **expected):
    """A ConfigError naming the first option of ``module`` that is not the value nnaccel supports (a pair of
    that value counts as the value)."""
    for option, value in expected.items():
        found = getattr(module, option)
        if found != value and not (isinstance(found, tuple) and set(found) == {value}):
            raise ConfigError(f"{module!r}: {option}={found!r} is not supported (only {option}={value!r})")


def _window(module):
    """A convolution's or pool's kernel_size, stride and padding; a padding by name ('same') is refused."""
    if isinstance(module.padding, str):
        raise ConfigError(f"{module!r}: padding={module.padding!r} is not supported; give the padding as numbers")
    return {"kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding}


def _host(tensor):
    return tensor.detach().cpu().numpy()


def _bias(module, size):
    return numpy.zeros(size) if module.bias is None else _host(module.bias)


def _linear(module):
    return _Spec(layers.Dense, {"in_features": module.in_features, "out_features": module.out_features},
                 {"weight": _host(module.weight).T, "bias": _bias(module, module.out_features)}, {}, module)


def _conv2d(module):
    _require(module, groups=1, dilation=1, padding_mode="zeros")
    options = {"in_channels": module.in_channels, "out_channels": module.out_channels, **_window(module)}
    return _Spec(layers.Conv2D, options, {"weight": _host(module.weight), "bias": _bias(module, module.out_channels)},
                 {}, module)


def _batchnorm(module):
    _require(module, affine=True, track_running_stats=True)
    if module.momentum is None:
        raise ConfigError(f"{module!r}: momentum=None (a cumulative average) is not supported")
    options = {"num_features": module.num_features, "momentum": module.momentum, "eps": module.eps}
    return _Spec(layers.BatchNorm, options, {"weight": _host(module.weight), "bias": _host(module.bias)},
                 {"running_mean": _host(module.running_mean), "running_var": _host(module.running_var)}, module)


def _maxpool2d(module):
    _require(module, ceil_mode=False, dilation=1, return_indices=False)
    return _Spec(layers.MaxPool2D, _window(module), {}, {}, module)


def _avgpool2d(module):
    _require(module, ceil_mode=False, count_include_pad=True, divisor_override=None)
    return _Spec(layers.AvgPool2D, _window(module), {}, {}, module)


def _flatten(module):
    _require(module, start_dim=1, end_dim=-1)
    return _Spec(layers.Flatten, {}, {}, {}, module)


def _dropout(module):
    return _Spec(layers.Dropout, {"rate": module.p}, {}, {}, module)


# torch.nn module -> its nnaccel layer; an Identity is left out
LAYER_OF_MODULE = {"Linear": _linear, "Conv2d": _conv2d, "BatchNorm1d": _batchnorm, "BatchNorm2d": _batchnorm,
                   "MaxPool2d": _maxpool2d, "AvgPool2d": _avgpool2d, "Flatten": _flatten, "Dropout": _dropout}
BATCHNORM_SAMPLES = {"BatchNorm1d": (1, "(features)"), "BatchNorm2d": (3, "(channels, height, width)")}  # rank, axes


def _sample_rank(module):
    """How many axes the samples of a Linear's, Conv2d's or BatchNorm's output have."""
    kind = type(module).__name__
    return BATCHNORM_SAMPLES[kind][0] if kind in BATCHNORM_SAMPLES else 1 if kind == "Linear" else 3


def _activation(module, rank):
    """The nnaccel activation of a torch activation module after a layer whose samples have ``rank`` axes."""
    name = ACTIVATION_OF_MODULE[type(module).__name__]
    _, params, fixed = TORCH_ACTIVATIONS[name]
    fixed = dict(fixed)  # Softmax's dim may be counted from the end: dim=-1 after a Linear is dim 1
    if fixed.pop("dim", None) is not None and module.dim is not None and module.dim % (rank + 1) != 1:
        raise ConfigError(f"{module!r}: only a softmax over dim 1 (the features, or the channels) is supported")
    _require(module, **fixed)
    return activations.get(name, **{ours: getattr(module, theirs) for ours, theirs in params.items()})


def _dtype(module):
    """The one float dtype of the module's parameters (float32 where it has none)."""
    dtypes = {str(p.dtype).removeprefix("torch.") for p in module.parameters()} or {"float32"}
    if len(dtypes) > 1 or not dtypes <= {"float32", "float64"}:
        raise ConfigError(f"from_torch needs the parameters all float32 or all float64, got "
                          f"{', '.join(sorted(dtypes))}")
    return numpy.dtype(dtypes.pop())


def _specs(torch, module):
    """The layers to build, one per module, each activation module folded into the layer before it; a module
    whose weights or statistics another module holds too (tied weights) is refused: each layer here has its own."""
    specs, previous, owners = [], None, {}
    for index, child in enumerate(module):
        kind = type(child).__name__
        if type(child) is not getattr(torch.nn, kind, None):
            kind = None  # not a torch.nn module, though it may share a name with one
        if kind == "Identity":
            continue
        try:
            if kind in ACTIVATION_OF_MODULE:
                if not specs or specs[-1].source is not previous or specs[-1].cls not in layers.ACTIVATED:
                    raise ConfigError(f"{child!r} comes {f'after {previous!r}' if previous else 'first'}: nnaccel "
                                      f"applies an activation only as part of a Dense, Conv2D or BatchNorm layer, "
                                      f"so it must directly follow a Linear, Conv2d or BatchNorm")
                activation = _activation(child, _sample_rank(specs[-1].source))
                if activation.name == "softmax" and type(previous).__name__ == "BatchNorm2d":
                    raise ConfigError(f"{child!r} after {previous!r}: nnaccel's BatchNorm applies a softmax over "
                                      f"features only, not over the channels of images")
                specs[-1].options["activation"] = activation
            elif kind in LAYER_OF_MODULE:
                for name, tensor in (*child.named_parameters(), *child.named_buffers()):
                    if owners.setdefault(id(tensor), index) != index:
                        raise ConfigError(f"{child!r} shares its {name} with module {owners[id(tensor)]} (tied "
                                          f"weights): nnaccel has no weight sharing, so the copies would train apart")
                specs.append(LAYER_OF_MODULE[kind](child)._replace(index=index))
            else:
                supported = ", ".join([*LAYER_OF_MODULE, "Identity", *ACTIVATION_OF_MODULE])
                raise ConfigError(f"{child!r} has no nnaccel equivalent; from_torch supports {supported}")
        except ConfigError as error:
            raise ConfigError(f"module {index}, {error}") from None
        previous = child
    return specs


def _image_shape(specs, first, built, sides=range(1, 257)):
    """The input shape of a net that starts with other layers than a Linear, given none: square images of
    the channels of its first Conv2d or BatchNorm2d (one where there is none), 28x28 (the digits') when the
    layers chain on it, else the one side on which they do; with no image layer (Conv2d, BatchNorm2d, a
    pool) and no such side, flat samples of the first Linear's or BatchNorm1d's features; a
    ConfigError when several sides fit, or none in a net with image layers."""
    images = [spec for spec in specs if spec.cls in (layers.Conv2D, layers.MaxPool2D, layers.AvgPool2D)
              or type(spec.source).__name__ == "BatchNorm2d"]
    channels = next((spec.options.get("in_channels", spec.options.get("num_features")) for spec in images
                     if spec.cls in (layers.Conv2D, layers.BatchNorm)), 1)

    def chains(side):
        shape = (channels, side, side)
        try:
            for layer in built:
                shape = layer.output_shape(shape)
        except ConfigError:
            return False
        return len(shape) == 1

    fitting = [side for side in sides if chains(side)]
    if 28 in fitting or len(fitting) == 1:
        return (channels, 28, 28) if 28 in fitting else (channels, fitting[0], fitting[0])
    flat = next((spec.options.get("in_features", spec.options.get("num_features")) for spec in specs
                 if spec.cls in (layers.Dense, layers.BatchNorm)), None)
    if not fitting and flat and not images:
        return (flat,)
    found = (f"the layers chain on {channels}x{fitting[0]}x{fitting[0]} to {channels}x{fitting[-1]}x{fitting[-1]}"
             if fitting else f"the layers chain on no {channels}-channel square image up to {sides[-1]}x{sides[-1]}")
    example = f"({channels}, 28, 28)" if images or not flat else f"({flat},)"
    raise ConfigError(f"from_torch needs input_shape, e.g. {example}, for a net that starts with "
                      f"{first.source!r}: {found}")


def _build(spec):
    """The nnaccel layer of ``spec``; an option nnaccel refuses (torch's ``Dropout(p=1.0)``) is a ConfigError
    naming the module."""
    try:
        return spec.cls(**spec.options)
    except ConfigError as error:
        raise _at_module(spec, error) from None


def _at_module(spec, error):
    """``error`` (nnaccel's words for a layer) as a ConfigError naming the torch module of ``spec``."""
    return ConfigError(f"module {spec.index}, {spec.source!r}: {error}")


def from_torch(module, input_shape=None, device="cpu", seed=0):
    """The nnaccel Sequential of a ``torch.nn.Sequential``, with its weights, biases and BatchNorm running
    statistics copied, in the dtype of its parameters (float32 or float64).

    ``input_shape`` is one sample's shape, e.g. (1, 28, 28); left out, it is the first Linear's inputs, or
    for a net that starts with other layers what ``_image_shape`` finds (square images, 28x28 where the
    layers chain on them). ``seed`` seeds the Dropout draws. Unsupported modules and options are a
    ConfigError naming them.
    """
    torch = _import_torch()
    if not isinstance(module, torch.nn.Sequential):
        raise ConfigError(f"from_torch takes a torch.nn.Sequential, got a {type(module).__name__}")
    dtype = _dtype(module)  # before _specs reads the weights: NumPy has no bfloat16
    specs = _specs(torch, module)
    if not specs:
        raise ConfigError("from_torch needs at least one layer other than Identity")
    built = [_build(spec) for spec in specs]
    first = next((spec for spec in specs if spec.cls is not layers.Dropout), specs[0])
    if input_shape is None and first.cls is not layers.Dense:
        input_shape = _image_shape(specs, first, built)
    try:
        model = Sequential(*built, input_shape=input_shape, device=device, seed=seed, dtype=dtype)
    except ConfigError as error:  # layers that do not chain: name the torch module (nnaccel counts no activation)
        if not hasattr(error, "layer"):
            raise
        raise _at_module(specs[error.layer], error) from None
    for spec, layer, shape in zip(specs, model.layers, model.shapes):
        rank, axes = BATCHNORM_SAMPLES.get(type(spec.source).__name__, (len(shape), ""))
        if len(shape) != rank:
            raise ConfigError(f"module {spec.index}, {spec.source!r}, takes {axes} samples but gets "
                              f"{describe_shape(shape)}")
        for name, value in spec.params.items():
            layer.params[name].data = model.backend.asarray(value, dtype=model.dtype)
        with model.backend.activate():  # cuda:1 copies on GPU 1
            for name, value in spec.buffers.items():
                layer.buffers[name][...] = model.backend.asarray(value, dtype=model.dtype)
    return model
