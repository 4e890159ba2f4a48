"""Layers: a batch of neurons each (weighted sum, bias, activation), plus Dropout.

A layer declares its parameters (name, shape, initialiser); the model
allocates them as views of one flat buffer per device, so the optimizer
updates every parameter in one pass. Work arrays are kept between steps and
reused (``_buffer``): a training step allocates almost nothing.
"""

import math

import numpy

from . import activations
from .errors import ConfigError, ShapeError, check_int


class Parameter:
    """A named weight array and its gradient, both views into the model's flat buffers."""

    def __init__(self, name, data, grad):
        self.name = name
        self._data = data
        self.grad = grad

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        """Assigning copies into the view, so the flat buffer stays shared."""
        if tuple(value.shape) != self._data.shape:
            raise ShapeError(f"parameter {self.name} has shape {self._data.shape}, got {tuple(value.shape)}")
        self._data[...] = value

    @property
    def shape(self):
        return self._data.shape

    def __repr__(self):
        return f"Parameter({self.name!r}, shape={self.shape})"


def init_weight(kind, shape, fan_in, fan_out, rng, dtype):
    """He normal (ReLU family) or Glorot uniform (sigmoid, tanh, linear) weights."""
    if kind == "he":
        return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(dtype)
    if kind == "glorot":
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, shape).astype(dtype)
    raise ConfigError(f"unknown init {kind!r}; valid: 'he', 'glorot'")


class Layer:
    """Base layer: forward saves what backward needs; backward fills the grads."""

    in_features = None
    out_features = None

    def __init__(self):
        self.ops = None
        self.params = {}
        self._work = {}

    def param_specs(self):
        """``[(name, shape, init(rng, dtype) -> host array)]`` for the model to allocate."""
        return []

    def bind(self, ops, params):
        """Attach to a backend and the Parameter views the model allocated."""
        self.ops = ops
        self.params = params
        self._work = {}

    def _buffer(self, key, shape, dtype):
        """A reusable work array of ``shape``: a leading-rows view of the largest seen."""
        buf = self._work.get(key)
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0] or buf.dtype != dtype:
            buf = self._work[key] = self.ops.empty(shape, dtype)
        return buf[: shape[0]]

    def forward(self, x, training=False):
        raise NotImplementedError

    def backward(self, dy, input_grad=True):
        raise NotImplementedError

    def config(self):
        raise NotImplementedError


class Dense(Layer):
    """``y = activation(x @ W + b)`` with W of shape (in, out) and b of shape (out,)."""

    def __init__(self, in_features, out_features, activation=None, init="auto"):
        super().__init__()
        self.in_features = check_int(in_features, "Dense in_features")
        self.out_features = check_int(out_features, "Dense out_features")
        self.activation = activations.get(activation)
        self.init = self.activation.init if init == "auto" else init

    def param_specs(self):
        fan_in, fan_out = self.in_features, self.out_features
        return [
            ("weight", (fan_in, fan_out),
             lambda rng, dtype: init_weight(self.init, (fan_in, fan_out), fan_in, fan_out, rng, dtype)),
            ("bias", (fan_out,), lambda rng, dtype: numpy.zeros(fan_out, dtype)),
        ]

    def forward(self, x, training=False):
        ops, weight, bias = self.ops, self.params["weight"], self.params["bias"]
        shape = (x.shape[0], self.out_features)
        z = ops.matmul(x, weight.data, out=self._buffer("z", shape, x.dtype))
        out = z if self.activation.uses_output else self._buffer("y", shape, x.dtype)
        self._x, self._z = x, z
        self._y = ops.bias_act(z, bias.data, self.activation, out)
        return self._y

    def backward(self, dy, input_grad=True):
        ops, weight, bias = self.ops, self.params["weight"], self.params["bias"]
        dz = self._buffer("dz", dy.shape, dy.dtype)
        ops.act_backward(dy, self._y, self._z, self.activation, dz, bias_grad=bias.grad)
        ops.matmul(self._x, dz, out=weight.grad, trans_a=True)
        if not input_grad:
            return None
        return ops.matmul(dz, weight.data, out=self._buffer("dx", self._x.shape, dy.dtype), trans_b=True)

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


class Dropout(Layer):
    """Zeroes a fraction ``rate`` of activations while training, scaling the rest.

    The mask is drawn from the backend's counter-based generator: the
    sequence is fixed by the model seed and the number of masks drawn, which
    is all a checkpoint needs to resume it exactly.
    """

    def __init__(self, rate=0.5):
        super().__init__()
        rate = float(rate)
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"Dropout rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.seed = 0
        self.counter = 0

    def forward(self, x, training=False):
        self._mask = None
        if not training or self.rate == 0.0:
            return x
        self._mask = self.ops.dropout_mask(x.shape, self.rate, self.seed, self.counter, x.dtype)
        self.counter += 1
        return self.ops.xp.multiply(x, self._mask, out=self._buffer("y", x.shape, x.dtype))

    def backward(self, dy, input_grad=True):
        if not input_grad:
            return None
        if self._mask is None:
            return dy
        return self.ops.xp.multiply(dy, self._mask, out=self._buffer("dx", dy.shape, dy.dtype))

    def config(self):
        return {"type": "Dropout", "rate": self.rate}


LAYERS = {cls.__name__: cls for cls in (Dense, Maxout, Dropout)}


def from_config(config):
    """Rebuild a layer from its ``config()`` dict."""
    config = dict(config)
    kind = config.pop("type", None)
    if kind not in LAYERS:
        raise ConfigError(f"unknown layer type {kind!r}; valid: {', '.join(LAYERS)}")
    if kind == "Dense":
        params = config.pop("activation_params", {})
        config["activation"] = activations.get(config.get("activation"), **params)
    return LAYERS[kind](**config)
