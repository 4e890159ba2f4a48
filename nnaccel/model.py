"""Sequential: layers in a row, with all parameters in one flat buffer per device."""

import numpy

from . import layers as layers_module
from .backend import get_backend
from .errors import ConfigError, ShapeError, check_int
from .layers import Layer, Parameter

FLOAT_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


class Sequential:
    """A network: ``forward`` runs the layers in order, ``backward`` in reverse.

    Parameters are listed layer by layer (weight, then bias) and live on the
    model's device as views of ``flat_params``; their gradients are views of
    ``flat_grads``. ``backward`` overwrites the gradients (it does not add).
    """

    def __init__(self, *layers, device="cpu", seed=0, dtype=numpy.float32):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ConfigError("Sequential needs at least one layer")
        for index, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise ConfigError(f"layer {index} is a {type(layer).__name__}, not an nnaccel layer")
        self.dtype = numpy.dtype(dtype)
        if self.dtype not in FLOAT_DTYPES:
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype}")
        self.layers = list(layers)
        self.seed = check_int(seed, "seed", minimum=0)
        self.training = False
        self._output_shape = None
        self.in_features, self.out_features = self._check_chain()
        host_params = self._initial_params(numpy.random.default_rng(self.seed))
        self._place(get_backend(device), host_params)

    def _check_chain(self):
        """Each layer's input width must be the previous layer's output width."""
        width = None
        first = None
        for index, layer in enumerate(self.layers):
            if layer.in_features is not None:
                if width is not None and layer.in_features != width:
                    raise ConfigError(f"layer sizes do not chain: layer {index} ({type(layer).__name__}) "
                                      f"takes {layer.in_features} inputs but the previous layer gives {width}")
                first = first or layer.in_features
            if layer.out_features is not None:
                width = layer.out_features
        if first is None:
            raise ConfigError("Sequential needs at least one Dense or Maxout layer")
        return first, width

    def _initial_params(self, rng):
        """Initial values of every parameter, drawn on the host so every device starts alike."""
        self._specs = []
        values = []
        for index, layer in enumerate(self.layers):
            if isinstance(layer, layers_module.Dropout):
                layer.seed = self.seed * 1000 + index
            for name, shape, init in layer.param_specs():
                self._specs.append((index, name, tuple(shape)))
                values.append(init(rng, self.dtype).ravel())
        return numpy.concatenate(values).astype(self.dtype, copy=False)

    def _place(self, backend, host_params):
        """Allocate the flat buffers on ``backend`` and hand each layer its views."""
        self.backend = backend
        self.device = backend.name
        self.flat_params = backend.asarray(host_params, dtype=self.dtype)
        self.flat_grads = backend.zeros(host_params.shape, self.dtype)
        self._parameters = []
        offset = 0
        per_layer = [{} for _ in self.layers]
        for index, name, shape in self._specs:
            size = int(numpy.prod(shape))
            parameter = Parameter(f"{index}.{name}",
                                  self.flat_params[offset:offset + size].reshape(shape),
                                  self.flat_grads[offset:offset + size].reshape(shape))
            per_layer[index][name] = parameter
            self._parameters.append(parameter)
            offset += size
        for layer, params in zip(self.layers, per_layer):
            layer.bind(backend, params)

    # ----- the public API -------------------------------------------------------
    def parameters(self):
        """Every Parameter, layer by layer: weight then bias."""
        return list(self._parameters)

    def num_parameters(self):
        return int(self.flat_params.size)

    def train(self, mode=True):
        """Training mode (Dropout active) or not; returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def check_input(self, x, what="x"):
        """A clear error unless ``x`` is a (batch, in_features) array of the model dtype here."""
        self.backend.check(x, what)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ShapeError(f"{what} has shape {tuple(x.shape)} but the first layer expects "
                             f"(batch, {self.in_features})")
        if x.dtype != self.dtype:
            raise ShapeError(f"{what} has dtype {x.dtype} but the model computes in {self.dtype}; "
                             f"convert it with .astype('{self.dtype}')")
        return x

    def forward(self, x):
        """The network's output for a batch ``x`` already on the model's device.

        Returns a new array: the layers' own work arrays are reused by the
        next call.
        """
        self.check_input(x)
        with self.backend.activate():
            return self._forward(x).copy()

    def _forward(self, x):
        """Forward without checks or copy: the output is a reused work array."""
        for layer in self.layers:
            x = layer.forward(x, self.training)
        self._output_shape = tuple(x.shape)
        return x

    def backward(self, dy):
        """Fill every parameter's ``grad`` from ``dy``, the loss gradient w.r.t. the output."""
        self.backend.check(dy, "dy")
        if self._output_shape is None:
            raise ShapeError("backward called before forward")
        if tuple(dy.shape) != self._output_shape:
            raise ShapeError(f"dy has shape {tuple(dy.shape)} but the last forward output was {self._output_shape}")
        with self.backend.activate():
            self._backward(dy)

    def _backward(self, dy):
        for index in range(len(self.layers) - 1, -1, -1):
            dy = self.layers[index].backward(dy, input_grad=index > 0)

    def predict(self, x, batch_size=1024):
        """Outputs for ``x`` (host or device array) as a NumPy array, in eval mode."""
        batch_size = check_int(batch_size, "predict batch_size")
        ops = self.backend
        x = ops.asarray(x, what="x")
        if x.dtype != self.dtype and x.dtype.kind in "fiu":
            x = x.astype(self.dtype)
        self.check_input(x)
        was_training, self.training = self.training, False
        try:
            with ops.activate():
                parts = [ops.to_host(self._forward(x[i:i + batch_size]))
                         for i in range(0, x.shape[0], batch_size)]
        finally:
            self.training = was_training
        return numpy.concatenate(parts) if parts else numpy.empty((0, self.out_features), self.dtype)

    def to(self, device):
        """Move the parameters to ``device`` (in place); returns self."""
        backend = get_backend(device)
        if backend is not self.backend:
            grads = backend.asarray(self.backend.to_host(self.flat_grads))
            self._place(backend, self.backend.to_host(self.flat_params))
            self.flat_grads[...] = grads
        return self

    def config(self):
        return {"layers": [layer.config() for layer in self.layers], "dtype": self.dtype.name,
                "seed": self.seed}

    @classmethod
    def from_config(cls, config, device="cpu"):
        return cls(*[layers_module.from_config(c) for c in config["layers"]], device=device,
                   seed=config.get("seed", 0), dtype=config.get("dtype", "float32"))

    def rng_state(self):
        """The dropout counters: all the random state a model carries."""
        return [getattr(layer, "counter", 0) for layer in self.layers]

    def set_rng_state(self, counters):
        for layer, counter in zip(self.layers, counters):
            if isinstance(layer, layers_module.Dropout):
                layer.counter = int(counter)

    def save(self, path):
        """Write the architecture and weights to ``path`` (.npz), atomically."""
        from .checkpoint import save

        save(path, self)

    def summary(self):
        lines = [f"Sequential on {self.device}, {self.num_parameters():,} parameters, {self.dtype}"]
        for index, layer in enumerate(self.layers):
            lines.append(f"  {index}: {layer.config()}")
        return "\n".join(lines)

    def __repr__(self):
        return self.summary()
