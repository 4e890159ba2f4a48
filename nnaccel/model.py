"""Sequential: layers in a row, with all parameters in one flat buffer per device."""

import gc
import itertools
import math
import sys
import warnings
import weakref

import numpy

from . import activations, layers as layers_module
from .backend import array_device, cuda_status, get_backend
from .errors import ConfigError, ShapeError, check_array, check_flag, check_int, check_seed
from .layers import Layer, Parameter, describe_shape

FLOAT_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
_MODEL_NUMBERS = itertools.count()  # each model's own: an optimizer's state belongs to one (optimizers._bind)


def check_float_range(xp, given, cast, what):
    """A clear error where ``cast``, the floats ``given`` converted to a narrower float type, holds inf for
    finite values: they are beyond that type's range. NaN or inf already in ``given`` are the caller's to
    refuse or keep. One pass over ``cast``; ``given`` is read only where ``cast`` holds NaN or inf."""
    if not bool(xp.isfinite(cast).all()) and bool(xp.isfinite(given).all()):
        raise ShapeError(f"{what} has values up to {float(xp.abs(given).max()):g} in size, beyond {cast.dtype}'s "
                         f"range ({float(numpy.finfo(cast.dtype).max):.2g}); scale {what}")


def _model_backend(device):
    """The backend a model on ``device`` lives on; ``"auto"`` without a usable GPU warns that the model is on
    the CPU, and why (the command line says it in its own words)."""
    backend = get_backend(device)
    if backend.name == "cpu" and isinstance(device, str) and device.strip().lower() == "auto":
        warnings.warn(f"device 'auto' puts the model on the CPU: {cuda_status()[1]}", stacklevel=3)
    return backend


def _views(specs, *flats):
    """``(layer index, name, view of each flat array)`` for consecutive ``(index, name, shape)`` specs."""
    offset = 0
    for index, name, shape in specs:
        size = math.prod(shape)
        yield (index, name, *(flat[offset:offset + size].reshape(shape) for flat in flats))
        offset += size


class Sequential:
    """A network: ``forward`` runs the layers in order, ``backward`` in reverse.

    Parameters are listed layer by layer (weight, then bias) and live on the
    model's device as views of ``flat_params``; their gradients are views of
    ``flat_grads``; state that is not trained (BatchNorm's running
    statistics) lives in ``flat_buffers``. ``backward`` overwrites the
    gradients (it does not add).

    ``input_shape`` is one sample's shape, e.g. ``(1, 28, 28)`` for a
    convolutional net (NCHW, as in PyTorch); a Dense-only model takes it from
    its first layer. Inputs may come as ``(batch, *input_shape)`` or flat,
    ``(batch, prod(input_shape))``, viewed as ``input_shape``.

    A layer computes with the views of one model, so it takes one place in one
    model: a layer object given twice, or one still in another model, is refused
    (a layer of a model that no longer exists may join a new one).
    """

    def __init__(self, *layers, device="cpu", seed=0, dtype=numpy.float32, input_shape=None):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ConfigError("Sequential needs at least one layer")
        for index, layer in enumerate(layers):
            if isinstance(layer, activations.Activation):  # PyTorch's Sequential(Linear, ReLU, ...)
                option = repr(layer.name) if layer.has_defaults() else f"nn.{layer!r}"
                raise ConfigError(f"layer {index} is the activation {layer!r}, not a layer: it is the option of "
                                  f"the layer before it, as nn.Dense(784, 128, activation={option}) (PyTorch's "
                                  f"Linear then {type(layer).__name__})")
            if not isinstance(layer, Layer):
                raise ConfigError(f"layer {index} is a {type(layer).__name__}, not an nnaccel layer")
            twice = any(layer is earlier for earlier in layers[:index])
            if not twice and layer.in_a_model():
                gc.collect()  # a model only a reference cycle keeps (a Trainer's) is gone, not in use
            if twice or layer.in_a_model():
                where = "this model" if twice else "another model"
                raise ConfigError(f"layer {index} {layer!r} is already in {where}: its weights live in one model's "
                                  f"buffers, so make a new layer per place")
        try:
            self.dtype = numpy.dtype(dtype)
        except (TypeError, ValueError):
            raise ConfigError(f"dtype must be float32 or float64, got {dtype!r}") from None
        if self.dtype not in FLOAT_DTYPES:
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype}")
        self.layers = list(layers)
        self.seed = check_seed(seed)
        self.training = False
        self._number = next(_MODEL_NUMBERS)
        self._output_shape = None
        self.input_shape = self._input_shape(input_shape)
        self.shapes = self._check_chain()
        self.in_features = math.prod(self.input_shape)
        self.out_features = math.prod(self.shapes[-1])
        host_params, host_buffers = self._initial_state(numpy.random.default_rng(self.seed))
        self._place(_model_backend(device), host_params, host_buffers)

    def _input_shape(self, input_shape):
        if input_shape is not None:
            shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else (input_shape,)
            return tuple(check_int(size, "input_shape") for size in shape)
        first = next((layer for layer in self.layers if layer.in_features is not None
                      or not isinstance(layer, layers_module.RandomLayer)), self.layers[0])
        if first.in_features is None:
            raise ConfigError(f"Sequential needs input_shape=(channels, height, width), or at least one Dense or "
                              f"Maxout layer first: its first layer {first!r} does not say what it takes")
        return (first.in_features,)

    def _check_chain(self):
        """Each layer's output shape from its input's: ``[input_shape, after layer 0, ...]``, or a ConfigError
        naming the layer, the shapes, and what would fit (its ``layer``, the index, for ``from_torch``)."""
        shapes = [self.input_shape]
        for index, layer in enumerate(self.layers):
            try:
                shapes.append(tuple(layer.output_shape(shapes[-1])))
            except ConfigError as error:
                source = f"layer {index - 1}, {self.layers[index - 1]!r}" if index else "the input"
                unchained = ConfigError(f"layer sizes do not chain: layer {index}, {layer!r}, after {source}: {error}")
                unchained.layer = index
                raise unchained from None
        if len(shapes[-1]) != 1:
            raise ConfigError(f"the last layer gives {describe_shape(shapes[-1])} outputs per sample; end with "
                              f"nn.Flatten() or a Dense layer")
        return shapes

    def _initial_state(self, rng):
        """Initial values of every parameter (drawn on the host so every device starts alike) and buffer."""
        self._specs, self._buffer_specs = [], []
        self._check_size()
        values, buffers = [numpy.zeros(0, self.dtype)], [numpy.zeros(0, self.dtype)]
        self.set_rng_state(self.seed, [0] * len(self.layers))
        for index, layer in enumerate(self.layers):
            for name, shape, init in layer.param_specs():
                self._specs.append((index, name, tuple(shape)))
                values.append(init(rng, self.dtype).ravel())
            for name, shape, value in layer.buffer_specs():
                self._buffer_specs.append((index, name, tuple(shape)))
                buffers.append(numpy.asarray(value, self.dtype).ravel())
        return numpy.concatenate(values), numpy.concatenate(buffers)

    def _check_size(self):
        """A ConfigError naming the largest layer when the parameters need more bytes than an address space
        holds (numpy would fail with 'Maximum allowed dimension exceeded'); what merely exceeds this
        machine's memory fails as a MemoryError."""
        counts = self._parameter_counts()
        if sum(counts) * self.dtype.itemsize > sys.maxsize:
            index = max(range(len(counts)), key=counts.__getitem__)
            raise ConfigError(f"the model has {sum(counts):,} parameters, more than any memory holds in {self.dtype}: "
                              f"layer {index}, {self.layers[index]!r}, has {counts[index]:,}")

    def _parameter_counts(self):
        """How many parameters each layer has."""
        return [sum(math.prod(shape) for _, shape, _ in layer.param_specs()) for layer in self.layers]

    def _place(self, backend, host_params, host_buffers):
        """Allocate the flat buffers on ``backend`` and hand each layer its views."""
        self.backend = backend
        self.device = backend.name
        self.flat_params = backend.asarray(host_params, dtype=self.dtype)
        self.flat_grads = backend.zeros(host_params.shape, self.dtype)
        self.flat_buffers = backend.asarray(host_buffers, dtype=self.dtype)
        self._parameters = []
        per_layer = [({}, {}) for _ in self.layers]
        for index, name, view, grad in _views(self._specs, self.flat_params, self.flat_grads):
            parameter = Parameter(f"{index}.{name}", view, grad, backend)
            per_layer[index][0][name] = parameter
            self._parameters.append(parameter)
        for index, name, view in _views(self._buffer_specs, self.flat_buffers):
            per_layer[index][1][name] = view
        for layer, (params, buffers) in zip(self.layers, per_layer):
            layer.bind(backend, params, buffers)
            layer._model = weakref.ref(self)  # weak: a layer does not keep its model alive

    # ----- the public API -------------------------------------------------------
    def parameters(self):
        """Every Parameter, layer by layer: weight then bias."""
        return list(self._parameters)

    def buffers(self):
        """Every buffer (state that is not trained: BatchNorm's running statistics) as ``(name, array)``,
        layer by layer, named like parameters (``"6.running_mean"``)."""
        return [(f"{index}.{name}", self.layers[index].buffers[name]) for index, name, _ in self._buffer_specs]

    def num_parameters(self):
        return int(self.flat_params.size)

    def work_arrays(self):
        """The work arrays the layers keep between calls (a larger batch replaces them): what a
        captured CUDA graph that writes into them must keep alive."""
        return [array for layer in self.layers for array in layer._work.values()]

    def train(self, mode=True):
        """Training mode (Dropout active) or not; returns self."""
        self.training = check_flag(mode, "mode")
        return self

    def eval(self):
        return self.train(False)

    def check_input(self, x, what="x"):
        """A clear error unless ``x`` is a batch of this model's inputs, ``(batch, *input_shape)`` or flat
        ``(batch, in_features)``, of the model dtype here."""
        self.backend.check(x, what)
        if x.ndim < 2 or (tuple(x.shape[1:]) != self.input_shape and tuple(x.shape[1:]) != (self.in_features,)):
            flat = f" or (batch, {self.in_features})" if len(self.input_shape) > 1 else ""
            raise ShapeError(f"{what} has shape {tuple(x.shape)} but the first layer expects "
                             f"(batch, {', '.join(map(str, self.input_shape))}){flat}")
        if x.dtype != self.dtype:
            raise ShapeError(f"{what} has dtype {x.dtype} but the model computes in {self.dtype}; "
                             f"convert it with .astype('{self.dtype}')")
        return x

    def forward(self, x):
        """The network's output for a batch ``x`` already on the model's device.

        Returns a new array: the layers' own work arrays are reused by the
        next call. An empty batch gives an empty output, as ``predict`` does.
        """
        self.check_input(x)
        if not x.shape[0]:
            return self.backend.empty((0, self.out_features), self.dtype)
        with self.backend.activate():
            return self._forward(x).copy()

    def __call__(self, x):
        """``model(x)`` is ``forward(x)``, as a PyTorch module or a Keras model is called (in the mode that
        ``train()``/``eval()`` set)."""
        return self.forward(x)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, index):
        """``model[i]`` is ``model.layers[i]``, as on PyTorch's Sequential; a slice is a list of this model's
        layers, not a new model (a layer takes one place in one model)."""
        return self.layers[index]

    def __iter__(self):
        return iter(self.layers)

    def _forward(self, x):
        """Forward without checks or copy: the output is a reused work array."""
        for x in self._layer_outputs(x, self.training):
            pass
        self._output_shape = tuple(x.shape)
        return self.layers[-1].in_dtype(x, self.dtype, "output")

    def _layer_outputs(self, x, training):
        """Each layer's output for ``x`` in turn: reused work arrays, in the dtype the layer stores (the
        model converts for a layer that computes in the model dtype only)."""
        if x.ndim == 2 and len(self.input_shape) > 1:
            x = x.reshape((x.shape[0],) + self.input_shape)  # flat rows viewed as images
        for layer in self.layers:
            x = layer.forward(x if layer.takes_storage_dtype else layer.in_dtype(x, self.dtype, "input"), training)
            yield x

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
        """Down to the first layer with weights, which computes no input gradient: the layers before it (an
        augmentation, a Flatten) learn nothing, and the data needs no gradient."""
        first = self._specs[0][0] if self._specs else len(self.layers)
        for index in range(len(self.layers) - 1, first - 1, -1):
            layer = self.layers[index]
            dy = layer.backward(dy if layer.takes_storage_dtype else layer.in_dtype(dy, self.dtype, "output_grad"),
                                input_grad=index > first)

    def to_model_dtype(self, x, what="x"):
        """Device array ``x`` in the model's float type: floats rounded (as Keras does), integers converted
        only where that is exact (float32 holds every integer up to 2**24; wider values are refused), finite
        floats only where they fit (1e39 would be inf in float32: refused; NaN and inf stay)."""
        mantissa = numpy.finfo(self.dtype).nmant + 1
        if x.dtype.kind in "iu" and x.dtype.itemsize * 8 - (x.dtype.kind == "i") > mantissa and x.size:
            low, high = int(self.backend.xp.min(x)), int(self.backend.xp.max(x))
            if max(-low, high) > 2 ** mantissa:
                raise ShapeError(f"{what} has {x.dtype} values from {low:,} to {high:,}, but {self.dtype} holds "
                                 f"integers exactly only up to {2 ** mantissa:,} in size; scale {what} or convert "
                                 f"it to floats yourself")
        if x.dtype == self.dtype:
            return x
        with numpy.errstate(over="ignore"):  # a float beyond the model dtype's range is refused below instead
            cast = x.astype(self.dtype)
        if x.dtype.kind == "f" and x.dtype.itemsize > self.dtype.itemsize:
            check_float_range(self.backend.xp, x, cast, what)
        return cast

    def _on_device(self, x, what="x"):
        """``x`` (a host or device array, nested lists) on the model's device, numbers in the model dtype as
        ``to_model_dtype`` converts them; other dtypes (bool, str) are left for ``check_input`` to refuse."""
        x = self.backend.asarray(check_array(x, what) if array_device(x) is None else x, what=what)
        return self.to_model_dtype(x, what) if x.dtype.kind in "fiu" else x

    def inference_batch(self, at_least=1):
        """The batch that ``predict`` and ``Trainer.evaluate`` use unless told: the backend's
        (``Backend.inference_batch``), from the largest array a layer's forward pass makes per sample."""
        values = max(layer.work_per_sample(shape) for layer, shape in zip(self.layers, self.shapes))
        return self.backend.inference_batch(values * self.dtype.itemsize, at_least)

    def predict(self, x, batch_size=None):
        """Outputs for ``x`` (host or device array) as a NumPy array, in eval mode, ``batch_size`` samples
        at a time (by default ``inference_batch()``: 1024, fewer on the CPU for a large convolution)."""
        batch_size = self.inference_batch() if batch_size is None else check_int(batch_size, "predict batch_size")
        ops = self.backend
        was_training, self.training = self.training, False
        try:
            with ops.activate():  # the conversion too: on cuda:1 its result is on GPU 1
                x = self.check_input(self._on_device(x))
                parts = [ops.to_host(self._forward(x[i:i + batch_size]))
                         for i in range(0, x.shape[0], batch_size)]
        finally:
            self.training = was_training
        return numpy.concatenate(parts) if parts else numpy.empty((0, self.out_features), self.dtype)

    def to(self, device):
        """Move the parameters and buffers to ``device`` (in place); returns self."""
        backend = _model_backend(device)
        if backend is not self.backend:
            grads = backend.asarray(self.backend.to_host(self.flat_grads))
            self._place(backend, self.backend.to_host(self.flat_params), self.backend.to_host(self.flat_buffers))
            with backend.activate():
                self.flat_grads[...] = grads
        return self

    def config(self):
        return {"layers": [layer.config() for layer in self.layers], "dtype": self.dtype.name,
                "seed": self.seed, "input_shape": list(self.input_shape)}

    @classmethod
    def from_config(cls, config, device="cpu"):
        return cls(*[layers_module.from_config(c) for c in config["layers"]], device=device,
                   seed=config.get("seed", 0), dtype=config.get("dtype", "float32"),
                   input_shape=config.get("input_shape"))

    @classmethod
    def layout(cls, config):
        """``(parameters, buffers, shapes)`` of the model ``from_config(config)`` would build, with nothing
        allocated: the ``(name, shape)`` of every parameter and buffer, named as ``parameters()`` and
        ``buffers()`` name them, and each layer's output shape after the input's. The layers and their chain
        are checked as the constructor checks them (dtype and seed are not); the checkpoint loader sizes a
        file against this before it builds anything."""
        plan = cls.__new__(cls)  # the constructor's checks, without its allocations
        plan.layers = [layers_module.from_config(c) for c in config["layers"]]
        if not plan.layers:
            raise ConfigError("Sequential needs at least one layer")
        plan.input_shape = plan._input_shape(config.get("input_shape"))
        shapes = plan._check_chain()
        parameters = [(f"{index}.{name}", tuple(shape)) for index, layer in enumerate(plan.layers)
                      for name, shape, _ in layer.param_specs()]
        buffers = [(f"{index}.{name}", tuple(shape)) for index, layer in enumerate(plan.layers)
                   for name, shape, _ in layer.buffer_specs()]
        return parameters, buffers, shapes

    def rng_state(self):
        """The counters of Dropout and RandomShift: all the random state a model carries."""
        return [getattr(layer, "counter", 0) for layer in self.layers]

    def set_rng_state(self, seed, counters):
        """Seed Dropout and RandomShift from the model's ``seed`` and set their counters (a checkpoint's,
        so a resumed run draws what the saved one would have)."""
        self.seed = seed
        for index, (layer, counter) in enumerate(zip(self.layers, counters)):
            if isinstance(layer, layers_module.RandomLayer):
                layer.seed, layer.counter = seed * 1000 + index, int(counter)

    def save(self, path):
        """Write the architecture and weights to ``path`` (.npz), atomically."""
        from .checkpoint import save

        save(path, self)

    def summary(self, print_fn=print):
        """Each layer with its output shape and parameter count, and the totals: printed through
        ``print_fn`` (None prints nothing) and returned as text."""
        text = self._summary_text()
        if print_fn is not None:
            print_fn(text)
        return text

    def _summary_text(self):
        counts = self._parameter_counts()
        rows = [("layer", "output shape", "parameters"), ("input", describe_shape(self.input_shape), "")]
        rows += [(f"{index}: {layer!r}", describe_shape(shape), f"{count:,}")
                 for index, (layer, shape, count) in enumerate(zip(self.layers, self.shapes[1:], counts))]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}".rstrip() for a, b, c in rows]
        buffers = int(self.flat_buffers.size)
        lines.append(f"{self.num_parameters():,} parameters" + (f" and {buffers:,} buffer values" if buffers else "")
                     + f", {self.dtype}, on {self.device}")
        return "\n".join(lines)

    def __repr__(self):
        return self._summary_text()

    @classmethod
    def from_torch(cls, module, input_shape=None, device="cpu", seed=0):
        """The model of a ``torch.nn.Sequential``, its weights and running statistics copied (needs PyTorch)."""
        from .torch_interop import from_torch

        return from_torch(module, input_shape, device, seed)

    def to_torch(self):
        """A ``torch.nn.Sequential`` computing what this model computes, its weights copied (needs PyTorch)."""
        from .torch_interop import to_torch

        return to_torch(self)
