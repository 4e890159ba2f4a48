"""ONNX export: a trained model as a standard ``.onnx`` file, to run where nnaccel is not installed
(onnxruntime, TensorRT, OpenVINO, a browser, a phone).

The graph computes what ``Sequential.predict`` computes, in eval mode: Dropout and RandomShift are left
out (they are the identity at inference) and BatchNorm normalises with its running statistics. Every
layer becomes standard operators of opset 17 (no custom ones), with the weights as initializers, in the
model's dtype (float32 or float64). The input, ``"input"``, is a batch of samples of ``input_shape``
with a dynamic batch size (not flat rows, which ``predict`` also takes); the output, ``"logits"``, is
``(batch, out_features)``. ONNX keeps float attributes in float32 (LeakyRelu's and Elu's alpha, BatchNorm's
epsilon), so a float64 export of those layers agrees to about 1e-8 only.

The ``onnx`` package is an optional extra: ``pip install 'nnaccel[onnx]'``.
"""

import math
from pathlib import Path

import numpy

from . import __version__, layers
from .checkpoint import atomic_write, check_writable, not_a_folder
from .errors import ConfigError
from .model import Sequential

OPSET = 17
IR_VERSION = 8  # the IR version that came with opset 17: onnxruntime 1.12 and later read it
INPUT, OUTPUT, BATCH = "input", "logits", "batch"


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install 'nnaccel[onnx]'") from None
    return onnx


class _Graph:
    """The nodes and initializers of the graph being built, each tensor under a fresh readable name."""

    def __init__(self, onnx, dtype):
        self.onnx, self.dtype = onnx, dtype
        self.nodes, self.initializers, self._names = [], [], {INPUT}

    def _fresh(self, name):
        fresh, count = name, 1
        while fresh in self._names:
            fresh, count = f"{name}_{count}", count + 1
        self._names.add(fresh)
        return fresh

    def constant(self, name, value, dtype=None):
        """An initializer holding ``value`` (in the model's dtype unless told); shared when the name is."""
        if name not in self._names:
            self._names.add(name)
            array = numpy.asarray(value, self.dtype if dtype is None else dtype)
            self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type, inputs, prefix, **attributes):
        """Append one node; returns the name of its output."""
        output = self._fresh(f"{prefix}.{op_type}")
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [output], name=output, **attributes))
        return output


# ----- activations: nnaccel activation name -> its ONNX operators -------------------------------------
def _gelu(graph, x, prefix, activation):
    """The exact GELU, ``0.5 * x * (1 + erf(x / sqrt 2))``, from basic operators (opset 17 has no Gelu)."""
    cdf = graph.op("Erf", [graph.op("Div", [x, graph.constant("sqrt2", math.sqrt(2.0))], prefix)], prefix)
    cdf = graph.op("Add", [cdf, graph.constant("one", 1.0)], prefix)
    return graph.op("Mul", [graph.op("Mul", [x, cdf], prefix), graph.constant("half", 0.5)], prefix)


def _operator(op_type, **attributes):
    """An activation that is one ONNX operator, its attributes read from the activation (``alpha="slope"``)."""
    return lambda graph, x, prefix, activation: graph.op(
        op_type, [x], prefix, **{name: getattr(activation, field) for name, field in attributes.items()})


ONNX_ACTIVATIONS = {  # (graph, x, prefix, activation) -> the activation's output
    "linear": lambda graph, x, prefix, activation: x,
    "relu": _operator("Relu"),
    "leaky_relu": _operator("LeakyRelu", alpha="slope"),
    "elu": _operator("Elu", alpha="alpha"),
    "sigmoid": _operator("Sigmoid"),
    "tanh": _operator("Tanh"),
    "softplus": _operator("Softplus"),
    "gelu": _gelu,
    "silu": lambda graph, x, prefix, activation: graph.op("Mul", [x, graph.op("Sigmoid", [x], prefix)], prefix),
    # over the features of a Dense layer, over the channels at each pixel of a Conv2D layer
    "softmax": lambda graph, x, prefix, activation: graph.op("Softmax", [x], prefix, axis=1),
}


# ----- layers: nnaccel layer class -> its ONNX operators ---------------------------------------------------
def _window(layer):
    """A convolution's or pool's ONNX attributes: kernel_shape, strides, pads (begin then end)."""
    return {"kernel_shape": list(layer.kernel_size), "strides": list(layer.stride), "pads": list(layer.padding) * 2}


def _dense(graph, layer, x, prefix, values):
    return graph.op("Gemm", [x, graph.constant(f"{prefix}.weight", values["weight"]),
                             graph.constant(f"{prefix}.bias", values["bias"])], prefix)


def _maxout(graph, layer, x, prefix, values):
    """``max over pieces of x @ W + b``: one Gemm computes every piece, viewed as (batch, out, pieces)."""
    width = layer.out_features * layer.pieces
    z = graph.op("Gemm", [x, graph.constant(f"{prefix}.weight", values["weight"].reshape(layer.in_features, width)),
                          graph.constant(f"{prefix}.bias", values["bias"].reshape(width))], prefix)
    pieces = graph.constant(f"{prefix}.pieces_shape", [0, layer.out_features, layer.pieces], numpy.int64)
    return graph.op("ReduceMax", [graph.op("Reshape", [z, pieces], prefix)], prefix, axes=[2], keepdims=0)


def _conv(graph, layer, x, prefix, values):
    return graph.op("Conv", [x, graph.constant(f"{prefix}.weight", values["weight"]),
                             graph.constant(f"{prefix}.bias", values["bias"])], prefix, **_window(layer))


def _batchnorm(graph, layer, x, prefix, values):
    inputs = [x] + [graph.constant(f"{prefix}.{name}", values[name])
                    for name in ("weight", "bias", "running_mean", "running_var")]
    return graph.op("BatchNormalization", inputs, prefix, epsilon=layer.eps)


LAYER_OPS = {
    layers.Dense: _dense,
    layers.Maxout: _maxout,
    layers.Conv2D: _conv,
    layers.BatchNorm: _batchnorm,
    layers.MaxPool2D: lambda graph, layer, x, prefix, values: graph.op("MaxPool", [x], prefix, **_window(layer)),
    layers.AvgPool2D: lambda graph, layer, x, prefix, values: graph.op("AveragePool", [x], prefix, count_include_pad=1,
                                                                       **_window(layer)),
    layers.Flatten: lambda graph, layer, x, prefix, values: graph.op("Flatten", [x], prefix, axis=1),
    layers.Dropout: lambda graph, layer, x, prefix, values: x,  # the identity at inference
    layers.RandomShift: lambda graph, layer, x, prefix, values: x,
}


def to_onnx(model):
    """The ONNX ``ModelProto`` of ``model`` (checked by ``onnx.checker``), not yet written anywhere."""
    if not isinstance(model, Sequential):  # a torch module: PyTorch's own torch.onnx.export writes those
        raise ConfigError(f"ONNX export takes an nnaccel Sequential, got a {type(model).__module__}."
                          f"{type(model).__qualname__}")
    onnx = _import_onnx()
    helper = onnx.helper
    size = sum(p.data.nbytes for p in model.parameters()) + sum(b.nbytes for _, b in model.buffers())
    if size > onnx.checker.MAXIMUM_PROTOBUF:  # protobuf could not even build the graph
        raise ConfigError(f"the model's weights take {size:,} bytes, more than the {onnx.checker.MAXIMUM_PROTOBUF:,} "
                          f"an ONNX file holds (protobuf's 2 GiB limit)")
    element_type = helper.np_dtype_to_tensor_dtype(model.dtype)
    graph = _Graph(onnx, model.dtype)
    x = INPUT
    for index, layer in enumerate(model.layers):
        if type(layer) not in LAYER_OPS:
            raise ConfigError(f"layer {index}, {layer!r}, has no ONNX export")
        values = {name: model.backend.to_host(p.data) for name, p in layer.params.items()}
        values.update({name: model.backend.to_host(b) for name, b in layer.buffers.items()})
        x = LAYER_OPS[type(layer)](graph, layer, x, str(index), values)
        activation = getattr(layer, "activation", None)
        if activation is not None:
            x = ONNX_ACTIVATIONS[activation.name](graph, x, str(index), activation)
    if x == INPUT:  # every layer was the identity
        graph.op("Identity", [x], "output")
    graph.nodes[-1].output[0] = OUTPUT
    onnx_graph = helper.make_graph(
        graph.nodes, "nnaccel", [helper.make_tensor_value_info(INPUT, element_type, [BATCH, *model.input_shape])],
        [helper.make_tensor_value_info(OUTPUT, element_type, [BATCH, model.out_features])], graph.initializers)
    proto = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="nnaccel", producer_version=__version__,
                              doc_string="exported by nnaccel: Sequential.predict in eval mode")
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export(model, path):
    """Write ``model`` as an ONNX file at ``path``, atomically (a temporary file renamed over it); returns
    the path. A path no file can be written to (a folder, a name ending in '/') is refused first."""
    given, path = path, Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"cannot export to {path}: {not_a_folder(path.parent)}")
    check_writable(given, "the ONNX file", example="model.onnx")  # as given: Path drops a final '/'
    data = to_onnx(model).SerializeToString()
    atomic_write(path, lambda handle: handle.write(data))
    return path
