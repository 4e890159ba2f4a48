"""Layers: a batch of neurons each (weighted sum, bias, activation), convolutions, pooling, batch
normalisation, and the layers that only reshape or randomise (Flatten, Dropout, RandomShift).

A layer declares its parameters (name, shape, initialiser); the model
allocates them as views of one flat buffer per device, so the optimizer
updates every parameter in one pass. Work arrays are kept between steps and
reused (``_buffer``): a training step allocates almost nothing.
"""

import inspect
import math

import numpy

from . import activations
from .backend.base import Window, array_device
from .errors import ConfigError, ShapeError, check_int, check_number, check_range, check_saveable

MAX_STRIDE = 2**31 - 1  # checkpoint.MAX_SIZE; the pools' corner indices and the GPU kernels' sizes are int32


class Parameter:
    """A named weight array and its gradient, both views into the model's flat buffers on ``backend``."""

    def __init__(self, name, data, grad, backend):
        self.name = name
        self._data = data
        self.grad = grad
        self._backend = backend

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        """Assigning copies into the view, so the flat buffer stays shared."""
        if not hasattr(value, "shape"):
            raise ShapeError(f"parameter {self.name} takes an array of shape {self._data.shape}, got a "
                             f"{type(value).__name__}; convert it with model.backend.asarray(...)")
        if tuple(value.shape) != self._data.shape:
            raise ShapeError(f"parameter {self.name} has shape {self._data.shape}, got {tuple(value.shape)}")
        if array_device(value) not in (None, "cpu") or self._backend.name != "cpu":  # host memory: memoryview, tensor
            self._backend.check(value, f"the new data of parameter {self.name}")
        with self._backend.activate():  # cuda:1 copies on GPU 1
            self._data[...] = value

    @property
    def shape(self):
        return self._data.shape

    def __repr__(self):
        return f"Parameter({self.name!r}, shape={self.shape})"


INIT_BLOCK = 1 << 16  # weights drawn at a time in float64: a large layer needs no float64 copy of itself


def init_weight(kind, shape, fan_in, fan_out, rng, dtype):
    """He normal (ReLU family) or Glorot uniform (sigmoid, tanh, linear) weights: drawn in float64, so that
    the values do not depend on ``dtype``, and rounded to it a block at a time (the generator's stream is
    the same in blocks as in one draw)."""
    if kind not in ("he", "glorot"):
        raise ConfigError(f"unknown init {kind!r}; valid: 'he', 'glorot'")
    weights = numpy.empty(shape, dtype)
    flat = weights.reshape(-1)
    he = kind == "he"
    scale = math.sqrt(2.0 / fan_in) if he else math.sqrt(6.0 / (fan_in + fan_out))  # a deviation, or a limit
    for start in range(0, flat.size, INIT_BLOCK):
        count = min(INIT_BLOCK, flat.size - start)
        flat[start:start + count] = rng.standard_normal(count) * scale if he else rng.uniform(-scale, scale, count)
    return weights


def _check_init(kind, what):
    """``kind`` if ``init_weight`` knows it, else a ConfigError now rather than when the model is built."""
    if not isinstance(kind, str) or kind not in ("he", "glorot"):
        raise ConfigError(f"{what}: unknown init {kind!r}; valid: 'auto', 'he', 'glorot'")
    return kind


def describe_shape(shape):
    """A sample's shape in words: ``16x5x5`` or ``400``."""
    return "x".join(map(str, shape))


def _pair(value, what, minimum=1, maximum=None):
    """``(a, b)`` from an int or a pair of ints, each at least ``minimum`` (and at most ``maximum``)."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(values) != 2:
        raise ConfigError(f"{what} must be an int or a pair of ints, got {value!r}")
    pair = tuple(check_int(v, what, minimum=minimum) for v in values)
    if maximum is not None and max(pair) > maximum:
        raise ConfigError(f"{what} must be at most {maximum:,} (what a checkpoint holds, and the kernels' 32-bit "
                          f"sizes), got {max(pair):,}")
    return pair


class Layer:
    """Base layer: forward saves what backward needs; backward fills the grads.

    ``output_shape`` gives one sample's output shape for one sample's input
    shape (no batch axis) and says, as a ConfigError, why an input does not fit.
    """

    in_features = None
    out_features = None
    # Whether forward and backward take arrays in the backend's storage dtype (bfloat16 under precision
    # "bf16" on a GPU) as well as in the model dtype: Dense and Conv2D then store that dtype, BatchNorm,
    # the poolings and Flatten keep what they get. The model hands every other layer its own dtype.
    takes_storage_dtype = False
    _model = None  # a weak reference to the Sequential whose views the layer holds (it takes one place)

    def __init__(self):
        self.ops = None
        self.params = {}
        self.buffers = {}
        self._work = {}

    def in_a_model(self):
        """Whether a model that still exists holds this layer's views."""
        return self._model is not None and self._model() is not None

    def param_specs(self):
        """``[(name, shape, init(rng, dtype) -> host array)]`` for the model to allocate."""
        return []

    def buffer_specs(self):
        """``[(name, shape, host array)]``: state that is not trained (BatchNorm's running statistics). The
        array may be a broadcast view (``numpy.broadcast_to``), so that asking for the specs allocates nothing
        (the checkpoint loader sizes a file against them before building the model)."""
        return []

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def work_per_sample(self, input_shape):
        """The values per sample of the largest array a forward pass makes (its output unless a layer says
        otherwise): what bounds the batch of predict and evaluate on a device with ``inference_bytes``."""
        return math.prod(self.output_shape(input_shape))

    def bind(self, ops, params, buffers=None):
        """Attach to a backend and the Parameter and buffer views the model allocated."""
        self.ops = ops
        self.params = params
        self.buffers = buffers or {}
        self._work = {}

    def _buffer(self, key, shape, dtype, batch_axis=0):
        """A reusable work array of ``shape``: a view of the largest seen (leading rows, or with
        ``batch_axis=1`` of a 2-D array, the first columns: a buffer for the exact shape then); images
        (N, C, H, W) as the backend lays them out (``image_array``), others contiguous."""
        if not batch_axis:
            return self.ops.leading_rows(self._work, key, shape, dtype, images=len(shape) == 4)
        buf = self._work.get(key)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            buf = self._work[key] = self.ops.empty(shape, dtype)
        return buf

    def in_dtype(self, array, dtype, key):
        """``array`` in ``dtype``: itself, or converted into the work array ``key`` (between a storage
        dtype and the model's)."""
        if array.dtype == dtype:
            return array
        return self.ops.convert(array, self._buffer(key, array.shape, dtype))

    def forward(self, x, training=False):
        raise NotImplementedError

    def backward(self, dy, input_grad=True):
        raise NotImplementedError

    def config(self):
        raise NotImplementedError

    def __repr__(self):
        """The call that builds this layer, arguments left at their defaults left out: ``Conv2D(1, 6, 5,
        padding=2, activation='relu')``, ``Dense(4, 2, activation=LeakyReLU(slope=0.2))``; a layer of one's
        own without ``config`` is its class name."""
        try:
            config = self.config()
        except NotImplementedError:
            return f"{type(self).__name__}(...)"
        shown, activation = [], getattr(self, "activation", None)
        for name, parameter in list(inspect.signature(type(self).__init__).parameters.items())[1:]:
            value = config.get(name)
            if name == "activation" and isinstance(activation, activations.Activation) \
                    and not activation.has_defaults():  # its name would rebuild other options
                value = activation
            if isinstance(value, list):
                value = value[0] if len(set(value)) == 1 else tuple(value)
            if parameter.default is inspect.Parameter.empty:
                shown.append(repr(value))
            elif name != "init" and value not in (parameter.default, "linear") and not (
                    name == "stride" and config.get("kernel_size") == config.get("stride")):
                shown.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"


def _flat_input(layer, shape, width):
    """Check that a layer taking ``width`` values per sample gets a flat input of that width."""
    name = type(layer).__name__
    if len(shape) != 1:
        raise ConfigError(f"needs a flat input but gets {describe_shape(shape)} values per sample: put "
                          f"nn.Flatten() before it ({name}({math.prod(shape)}, ...) would then fit)")
    if shape[0] != width:
        raise ConfigError(f"takes {width} inputs but gets {shape[0]}: {name}({shape[0]}, ...) would fit")


def _largest_window(window, input_shape):
    """What would fit where ``window`` does not fit a (channels, height, width) input: the largest window
    with its padding."""
    height, width = window.padded_size(*input_shape[1:])
    return f": at most {height}x{width} with {'that' if window.ph or window.pw else 'no'} padding would fit"


class Dense(Layer):
    """``y = activation(x @ W + b)`` with W of shape (in, out) and b of shape (out,).

    Its activations, the gradients it passes on and the copies of ``x`` and W its
    GEMMs read are in the backend's storage dtype (bfloat16 under precision "bf16"
    on a GPU); W, b and their gradients stay in the model dtype.
    """

    takes_storage_dtype = True

    def __init__(self, in_features, out_features, activation=None, init="auto"):
        super().__init__()
        self.in_features = check_int(in_features, "Dense in_features")
        self.out_features = check_int(out_features, "Dense out_features")
        self.activation = activations.get(activation)
        self.init = _check_init(self.activation.init if init == "auto" else init, "Dense init")

    def param_specs(self):
        fan_in, fan_out = self.in_features, self.out_features
        return [
            ("weight", (fan_in, fan_out),
             lambda rng, dtype: init_weight(self.init, (fan_in, fan_out), fan_in, fan_out, rng, dtype)),
            ("bias", (fan_out,), lambda rng, dtype: numpy.zeros(fan_out, dtype)),
        ]

    def output_shape(self, input_shape):
        _flat_input(self, input_shape, self.in_features)
        return (self.out_features,)

    def forward(self, x, training=False):
        ops, weight, bias = self.ops, self.params["weight"], self.params["bias"]
        dtype = ops.storage_dtype(weight.data.dtype, self.activation)
        shape = (x.shape[0], self.out_features)
        self._x, self._w = self.in_dtype(x, dtype, "x"), self.in_dtype(weight.data, dtype, "weight")
        z = ops.matmul(self._x, self._w, out=self._buffer("z", shape, dtype))
        out = z if self.activation.uses_output else self._buffer("y", shape, dtype)
        self._z = z
        self._y = ops.bias_act(z, bias.data, self.activation, out)
        return self._y

    def backward(self, dy, input_grad=True):
        ops, weight, bias = self.ops, self.params["weight"], self.params["bias"]
        dy = self.in_dtype(dy, self._z.dtype, "dy")
        dz = self._buffer("dz", dy.shape, dy.dtype)
        ops.act_backward(dy, self._y, self._z, self.activation, dz, bias_grad=bias.grad)
        ops.matmul(self._x, dz, out=weight.grad, trans_a=True)
        if not input_grad:
            return None
        return ops.matmul(dz, self._w, out=self._buffer("dx", self._x.shape, dy.dtype), trans_b=True)

    def config(self):
        return {"type": "Dense", "in_features": self.in_features, "out_features": self.out_features,
                "activation": self.activation.name, "activation_params": self.activation.config(),
                "init": self.init}


class Maxout(Layer):
    """Maxout units: each output is the max of ``pieces`` affine pieces (Goodfellow 2013)."""

    def __init__(self, in_features, out_features, pieces=2):
        super().__init__()
        self.in_features = check_int(in_features, "Maxout in_features")
        self.out_features = check_int(out_features, "Maxout out_features")
        self.pieces = check_int(pieces, "Maxout pieces")

    def param_specs(self):
        shape = (self.in_features, self.out_features, self.pieces)
        fan_in, fan_out = self.in_features, self.out_features
        return [
            ("weight", shape, lambda rng, dtype: init_weight("glorot", shape, fan_in, fan_out, rng, dtype)),
            ("bias", shape[1:], lambda rng, dtype: numpy.zeros(shape[1:], dtype)),
        ]

    def output_shape(self, input_shape):
        _flat_input(self, input_shape, self.in_features)
        return (self.out_features,)

    def work_per_sample(self, input_shape):
        return self.out_features * self.pieces  # every piece's sum

    def forward(self, x, training=False):
        ops, weight, bias = self.ops, self.params["weight"], self.params["bias"]
        n, width = x.shape[0], self.out_features * self.pieces
        z = ops.matmul(x, weight.data.reshape(self.in_features, width),
                       out=self._buffer("z", (n, width), x.dtype))
        z += bias.data.reshape(width)
        self._x = x
        self._index = self._buffer("index", (n, self.out_features), numpy.int32)
        y = self._buffer("y", (n, self.out_features), x.dtype)
        return ops.maxout_forward(z.reshape(n, self.out_features, self.pieces), y, self._index)

    def backward(self, dy, input_grad=True):
        ops, weight, bias = self.ops, self.params["weight"], self.params["bias"]
        n, width = dy.shape[0], self.out_features * self.pieces
        dz = self._buffer("dz", (n, width), dy.dtype)
        ops.maxout_backward(dy, self._index, dz.reshape(n, self.out_features, self.pieces))
        ops.bias_grad(dz, bias.grad.reshape(width))
        ops.matmul(self._x, dz, out=weight.grad.reshape(self.in_features, width), trans_a=True)
        if not input_grad:
            return None
        return ops.matmul(dz, weight.data.reshape(self.in_features, width),
                          out=self._buffer("dx", self._x.shape, dy.dtype), trans_b=True)

    def config(self):
        return {"type": "Maxout", "in_features": self.in_features, "out_features": self.out_features,
                "pieces": self.pieces}


class RandomLayer(Layer):
    """A layer that draws random numbers while training (Dropout, RandomShift).

    It draws from the backend's counter-based generator: the sequence is
    fixed by the seed (the model sets it from its own seed and the layer's
    position) and the number of draws so far, ``counter``, which is all a
    checkpoint needs to resume it exactly, on any device. While a CUDA graph
    is captured it draws with ``device_counter``, a copy of ``counter`` on the
    device that the graph reads at each replay (``nnaccel.graphs`` sets it).
    """

    def __init__(self):
        super().__init__()
        self.seed = 0
        self.counter = 0
        self.device_counter = None

    def _draw(self):
        """The counter this step draws with; ``counter`` moves on."""
        counter = self.counter if self.device_counter is None else self.device_counter
        self.counter += 1
        return counter

    @property
    def draws(self):
        """Whether a training step draws (and so advances ``counter``)."""
        raise NotImplementedError


class Dropout(RandomLayer):
    """Zeroes a fraction ``rate`` of activations while training, scaling the rest."""

    def __init__(self, rate=0.5):
        super().__init__()
        self.rate = check_range(rate, "Dropout rate", 0.0, 1.0, high_open=True)  # NaN and "0.5" refused too

    @property
    def draws(self):
        return self.rate != 0.0

    def forward(self, x, training=False):
        self._mask = None
        if not training or not self.draws:
            return x
        mask = self.ops.dropout_mask(x.shape, self.rate, self.seed, self._draw(), x.dtype)
        self._mask = self.ops.in_image_layout(mask, self._work, "mask")
        return self.ops.xp.multiply(x, self._mask, out=self._buffer("y", x.shape, x.dtype))

    def backward(self, dy, input_grad=True):
        if not input_grad:
            return None
        if self._mask is None:
            return dy
        return self.ops.xp.multiply(dy, self._mask, out=self._buffer("dx", dy.shape, dy.dtype))

    def config(self):
        return {"type": "Dropout", "rate": self.rate}


class RandomShift(RandomLayer):
    """Data augmentation: while training, moves each image by up to ``max_shift`` pixels in each direction
    (zeros come in at the edges), drawn per image; at inference it passes its input through."""

    def __init__(self, max_shift=2):
        super().__init__()
        self.max_shift = check_int(max_shift, "RandomShift max_shift", minimum=0)

    @property
    def draws(self):
        return self.max_shift != 0

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ConfigError(f"moves images (channels, height, width) but gets a {describe_shape(input_shape)} "
                              f"input")
        return tuple(input_shape)

    def forward(self, x, training=False):
        self._shifts = None
        if not training or not self.draws:
            return x
        self._shifts = self.ops.random_shifts(x.shape[0], self.max_shift, self.seed, self._draw())
        return self.ops.shift_images(x, self._shifts, self._buffer("y", x.shape, x.dtype))

    def backward(self, dy, input_grad=True):
        if not input_grad or self._shifts is None:
            return dy if input_grad else None
        return self.ops.shift_images(dy, -self._shifts, self._buffer("dx", dy.shape, dy.dtype))  # the adjoint

    def config(self):
        return {"type": "RandomShift", "max_shift": self.max_shift}


class Conv2D(Layer):
    """A 2-D convolution of NCHW images: ``out_channels`` filters of ``in_channels x kh x kw`` weights plus a
    bias, then the activation; PyTorch's layout (weight (out, in, kh, kw)) and arithmetic (cross-correlation,
    zero padding, floor of the output size).

    The batched weighted sum is the backend's one matmul: the windows of the
    batch become the columns of one matrix (``im2col``, C*kh*kw rows), the
    weight times it gives every output position, and one fused op adds the
    bias per channel, applies the activation and writes the NCHW output. Its
    work arrays are in the backend's storage dtype, as Dense's are.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, activation=None, init="auto"):
        super().__init__()
        self.in_channels = check_int(in_channels, "Conv2D in_channels")
        self.out_channels = check_int(out_channels, "Conv2D out_channels")
        self.kernel_size = _pair(kernel_size, "Conv2D kernel_size")
        self.stride = _pair(stride, "Conv2D stride", maximum=MAX_STRIDE)
        self.padding = self._padding(padding)
        self.window = Window(*self.kernel_size, *self.stride, *self.padding)
        self.activation = activations.get(activation)
        self.init = _check_init(self.activation.init if init == "auto" else init, "Conv2D init")

    def _padding(self, padding):
        """The padding as a pair of ints; PyTorch's and Keras's ``"valid"`` is none, ``"same"`` keeps the
        image's size (stride 1 as PyTorch's, and an odd kernel: an even one pads one side more)."""
        if not isinstance(padding, str):
            return _pair(padding, "Conv2D padding", minimum=0)
        if padding.lower() == "valid":
            return (0, 0)
        if padding.lower() != "same":
            raise ConfigError(f"Conv2D padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
        if self.stride != (1, 1) or not all(k % 2 for k in self.kernel_size):
            raise ConfigError(f"Conv2D padding 'same' needs stride 1 and an odd kernel_size (each side padded "
                              f"alike), got stride {self.stride} and kernel_size {self.kernel_size}")
        return tuple(k // 2 for k in self.kernel_size)

    def param_specs(self):
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        area = math.prod(self.kernel_size)
        fan_in, fan_out = self.in_channels * area, self.out_channels * area
        return [
            ("weight", shape, lambda rng, dtype: init_weight(self.init, shape, fan_in, fan_out, rng, dtype)),
            ("bias", (self.out_channels,), lambda rng, dtype: numpy.zeros(self.out_channels, dtype)),
        ]

    def output_shape(self, input_shape):
        if len(input_shape) != 3 or input_shape[0] != self.in_channels:
            fits = f": Conv2D({input_shape[0]}, {self.out_channels}, ...) would fit" if len(input_shape) == 3 else ""
            raise ConfigError(f"takes images of {self.in_channels} channel(s) (channels, height, width) but gets a "
                              f"{describe_shape(input_shape)} input{fits}")
        oh, ow = self.window.output_size(*input_shape[1:])
        if oh < 1 or ow < 1:
            raise ConfigError(f"a {describe_shape(self.kernel_size)} kernel with padding {self.padding} does not fit "
                              f"a {describe_shape(input_shape[1:])} image{_largest_window(self.window, input_shape)}")
        return (self.out_channels, oh, ow)

    def work_per_sample(self, input_shape):
        _, oh, ow = self.output_shape(input_shape)
        return max(self.in_channels * math.prod(self.kernel_size), self.out_channels) * oh * ow  # the columns

    takes_storage_dtype = True

    def forward(self, x, training=False):
        ops, weight, bias = self.ops, self.params["weight"], self.params["bias"]
        dtype = ops.storage_dtype(weight.data.dtype, self.activation)
        n = x.shape[0]
        oh, ow = self.window.output_size(*x.shape[2:])
        depth = self.in_channels * math.prod(self.kernel_size)
        self._x = x = self.in_dtype(x, dtype, "x")
        self._w = self.in_dtype(weight.data.reshape(self.out_channels, depth), dtype, "weight")
        self._cols = ops.im2col(x, self.window, self._buffer("cols", (depth, n * oh * ow), dtype, batch_axis=1))
        y = self._buffer("y", (n, self.out_channels, oh, ow), dtype)
        rows = ops.image_rows(y)  # the activation's output, written in place, where y lies as the rows do
        shape = (self.out_channels, n * oh * ow)
        self._z = ops.matmul(self._w, self._cols, out=rows if rows is not None and self.activation.uses_output
                             else self._buffer("z", shape, dtype, batch_axis=1))
        if self.activation.uses_output:
            rows = self._z
        self._rows = rows if rows is not None else self._buffer("rows", shape, dtype, batch_axis=1)
        return ops.bias_act_to_nchw(self._z, bias.data, self.activation, self._rows, y)

    def backward(self, dy, input_grad=True):
        ops, weight, bias = self.ops, self.params["weight"], self.params["bias"]
        depth = self.in_channels * math.prod(self.kernel_size)
        dy = self.in_dtype(dy, self._z.dtype, "dy")
        dz = ops.act_backward_from_nchw(dy, self._rows, self._z, self.activation,
                                        self._buffer("dz", self._z.shape, dy.dtype, batch_axis=1),
                                        bias_grad=bias.grad)
        ops.matmul(dz, self._cols, out=weight.grad.reshape(self.out_channels, depth), trans_b=True)
        if not input_grad:
            return None
        dcols = ops.matmul(self._w, dz, out=self._buffer("dcols", self._cols.shape, dy.dtype, batch_axis=1),
                           trans_a=True)
        return ops.col2im(dcols, self.window, self._buffer("dx", self._x.shape, dy.dtype))

    def config(self):
        return {"type": "Conv2D", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "activation": self.activation.name, "activation_params": self.activation.config(), "init": self.init}


class _Pool2D(Layer):
    """Pooling over windows of ``kernel_size`` moved by ``stride`` (default: the kernel size), with ``padding``
    of at most half the kernel (as PyTorch allows); in the dtype it gets."""

    takes_storage_dtype = True

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        name = type(self).__name__
        self.kernel_size = _pair(kernel_size, f"{name} kernel_size")
        self.stride = _pair(self.kernel_size if stride is None else stride, f"{name} stride", maximum=MAX_STRIDE)
        self.padding = _pair(padding, f"{name} padding", minimum=0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ConfigError(f"{name} padding {self.padding} must be at most half the kernel size {self.kernel_size}")
        self.window = Window(*self.kernel_size, *self.stride, *self.padding)

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ConfigError(f"pools images (channels, height, width) but gets a {describe_shape(input_shape)} input")
        oh, ow = self.window.output_size(*input_shape[1:])
        if oh < 1 or ow < 1:
            raise ConfigError(f"a {describe_shape(self.kernel_size)} window does not fit a "
                              f"{describe_shape(input_shape[1:])} image{_largest_window(self.window, input_shape)}")
        return (input_shape[0], oh, ow)

    def _out_shape(self, x):
        return (*x.shape[:2], *self.window.output_size(*x.shape[2:]))

    def config(self):
        return {"type": type(self).__name__, "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding)}


class MaxPool2D(_Pool2D):
    """The maximum of each window (NaN propagates), remembering where it was for the backward pass."""

    def forward(self, x, training=False):
        shape = self._out_shape(x)
        self._x_shape = x.shape
        self._index = self._buffer("index", shape, numpy.int32)
        return self.ops.maxpool_forward(x, self.window, self._buffer("y", shape, x.dtype), self._index)

    def backward(self, dy, input_grad=True):
        if not input_grad:
            return None
        return self.ops.maxpool_backward(dy, self._index, self.window, self._buffer("dx", self._x_shape, dy.dtype))


class AvgPool2D(_Pool2D):
    """The mean of each window, padding counted as zeros (PyTorch's ``count_include_pad``)."""

    def forward(self, x, training=False):
        self._x_shape = x.shape
        return self.ops.avgpool_forward(x, self.window, self._buffer("y", self._out_shape(x), x.dtype))

    def backward(self, dy, input_grad=True):
        if not input_grad:
            return None
        return self.ops.avgpool_backward(dy, self.window, self._buffer("dx", self._x_shape, dy.dtype))


class Flatten(Layer):
    """(N, C, H, W) to (N, C*H*W) in C order, as PyTorch's ``nn.Flatten``: a view, no copy (the gradient
    coming back goes to the backend's image layout, ``Backend.in_image_layout``)."""

    takes_storage_dtype = True

    def output_shape(self, input_shape):
        return (math.prod(input_shape),)

    def forward(self, x, training=False):
        self._x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy, input_grad=True):
        if not input_grad:
            return None
        return self.ops.in_image_layout(dy.reshape(self._x_shape), self._work, "dx")

    def config(self):
        return {"type": "Flatten"}


class BatchNorm(Layer):
    """Batch normalisation (Ioffe and Szegedy) as PyTorch's BatchNorm1d/2d: over the batch for (N, F)
    inputs, over batch and space per channel for (N, C, H, W); the batch's statistics while training
    (biased variance), running estimates otherwise (``momentum`` 0.1: running = 0.9 running + 0.1 batch,
    with the unbiased variance). Parameters: weight (gamma) then bias (beta); buffers: running_mean,
    running_var. It normalises in the dtype it gets (the model's where its activation has no kernel for a
    storage dtype); the statistics stay in the model dtype.

    ``activation`` (default linear) is applied to the normalised values, as Dense and Conv2D apply theirs:
    PyTorch's Conv2d-BatchNorm2d-ReLU block is ``Conv2D(...)`` then ``BatchNorm(c, activation="relu")``
    (a softmax only over features: the GPU's runs over the last axis)."""

    takes_storage_dtype = True

    def __init__(self, num_features, momentum=0.1, eps=1e-5, activation=None):
        super().__init__()
        self.num_features = check_int(num_features, "BatchNorm num_features")
        self.momentum = check_number(momentum, "BatchNorm momentum", allow_zero=True)
        if self.momentum > 1:
            raise ConfigError(f"BatchNorm momentum must be in [0, 1], got {momentum!r}")
        self.eps = check_number(eps, "BatchNorm eps")
        self.activation = activations.get(activation)

    def param_specs(self):
        c = self.num_features
        return [("weight", (c,), lambda rng, dtype: numpy.ones(c, dtype)),
                ("bias", (c,), lambda rng, dtype: numpy.zeros(c, dtype))]

    def buffer_specs(self):
        c = self.num_features
        return [("running_mean", (c,), numpy.broadcast_to(0.0, (c,))),
                ("running_var", (c,), numpy.broadcast_to(1.0, (c,)))]

    def output_shape(self, input_shape):
        if input_shape[0] != self.num_features or len(input_shape) not in (1, 3):
            raise ConfigError(f"normalises {self.num_features} features or channels (F or C x H x W) but gets a "
                              f"{describe_shape(input_shape)} input: BatchNorm({input_shape[0]}) would fit"
                              if len(input_shape) in (1, 3) else
                              f"takes (features) or (channels, height, width) inputs, not "
                              f"{describe_shape(input_shape)}")
        if len(input_shape) == 3 and self.activation.name == "softmax":
            raise ConfigError("applies a softmax only over features, not over the channels of images: give the "
                              "softmax to the Conv2D before it, or to a Dense layer after a Flatten")
        return tuple(input_shape)

    def forward(self, x, training=False):
        ops, gamma, beta = self.ops, self.params["weight"].data, self.params["bias"].data
        if ops.storage_dtype(gamma.dtype, self.activation) == gamma.dtype:  # also where its activation has no
            x = self.in_dtype(x, gamma.dtype, "x")  # kernel for a storage dtype (softmax, under bf16)
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1)
        self._x3, self._training = x3, training
        self._mean, self._invstd = (self._buffer(name, (c,), gamma.dtype) for name in ("mean", "invstd"))
        if training:
            if n * x3.shape[2] < 2:
                raise ShapeError(f"BatchNorm({c}) needs more than one value per channel to train, got a batch of "
                                 f"shape {tuple(x.shape)}")
            ops.batchnorm_stats(x3, self._mean, self._invstd, self.eps, self.buffers["running_mean"],
                                self.buffers["running_var"], self.momentum)
        else:
            self._mean[...] = self.buffers["running_mean"]
            ops.xp.add(self.buffers["running_var"], self.eps, out=self._invstd)
            ops.xp.sqrt(self._invstd, out=self._invstd)
            ops.xp.divide(1.0, self._invstd, out=self._invstd)
        self._z = self._buffer("z", x.shape, x.dtype)
        ops.batchnorm_apply(x3, self._mean, self._invstd, gamma, beta, self._z.reshape(x3.shape))
        if self.activation.name == "linear":
            return self._z
        out = self._z if self.activation.uses_output else self._buffer("y", x.shape, x.dtype)
        self._y = ops.bias_act(self._z, None, self.activation, out)
        return self._y

    def backward(self, dy, input_grad=True):
        ops, gamma, beta = self.ops, self.params["weight"], self.params["bias"]
        dy = self.in_dtype(dy, self._x3.dtype, "dy")
        if self.activation.name != "linear":
            dy = ops.act_backward(dy, self._y, self._z, self.activation, self._buffer("dz", dy.shape, dy.dtype))
        dx = self._buffer("dx", dy.shape, dy.dtype)
        ops.batchnorm_backward(dy.reshape(self._x3.shape), self._x3, self._mean, self._invstd, gamma.data,
                               dx.reshape(self._x3.shape), gamma.grad, beta.grad, self._training)
        return dx if input_grad else None

    def config(self):
        return {"type": "BatchNorm", "num_features": self.num_features, "momentum": self.momentum, "eps": self.eps,
                "activation": self.activation.name, "activation_params": self.activation.config()}


LAYERS = {cls.__name__: cls for cls in (Dense, Maxout, Dropout, RandomShift, Conv2D, MaxPool2D, AvgPool2D, Flatten,
                                        BatchNorm)}
ACTIVATED = (Dense, Conv2D, BatchNorm)  # the layers that apply an activation of their own


def check_saveable_layers(layers):
    """A ConfigError naming the first layer or activation of one's own (a subclass of nnaccel's too) in ``layers``:
    a checkpoint rebuilds nnaccel's from their names, and would load a subclass as its parent, computing otherwise
    (one without ``config`` failed with NotImplementedError, after an epoch under ModelCheckpoint)."""
    def either(kinds):
        names = [f"nn.{kind.__name__}" for kind in kinds]
        return f"{', '.join(names[:-1])} or {names[-1]}"

    for layer in layers:
        check_saveable(layer, LAYERS.values(), "layer", either(LAYERS.values()))
        if isinstance(layer, ACTIVATED):
            check_saveable(layer.activation, activations.ACTIVATIONS.values(), "activation",
                           either(activations.ACTIVATIONS.values()))


def from_config(config):
    """Rebuild a layer from its ``config()`` dict."""
    config = dict(config)
    kind = config.pop("type", None)
    if kind not in LAYERS:
        raise ConfigError(f"unknown layer type {kind!r}; valid: {', '.join(LAYERS)}")
    if "activation" in config:
        params = config.pop("activation_params", {})
        config["activation"] = activations.get(config.get("activation"), **params)
    return LAYERS[kind](**config)
