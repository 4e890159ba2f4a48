"""Losses: the mean over a batch, with the gradient computed in the same pass.

``forward(y, target)`` returns the loss as a device scalar (a 0-d CuPy array
on a GPU, a NumPy scalar on the CPU; read it with ``float()`` when you need
it: that synchronises a GPU); ``backward()`` returns the gradient w.r.t.
``y`` computed during ``forward``. Targets are checked where it costs no
device synchronisation: the Trainer checks a whole data set once (label
range included); ``forward`` checks shapes, and label values on the CPU.
"""

import numpy

from .backend import array_device, get_backend
from .errors import ConfigError, ShapeError, check_saveable, described


class Loss:
    """Base class: targets are prepared once (``prepare_targets``), then each step computes."""

    name = ""

    def __init__(self):
        self._grad = None

    def _ops(self, y):
        where = array_device(y)
        if where is None:
            raise ShapeError(f"loss input y must be a NumPy or CuPy array, got {type(y).__name__}")
        return get_backend(where)

    def _grad_buffer(self, ops, y):
        if self._grad is None or self._grad.shape != y.shape or self._grad.dtype != y.dtype \
                or array_device(self._grad) != ops.name:
            self._grad = ops.empty(y.shape, y.dtype)
        return self._grad

    def prepare_targets(self, ops, target, outputs, dtype, what="target"):
        """``target`` (on the device) in the form the loss computes with, checked against
        ``outputs`` columns: the Trainer does this once per data set, not per step."""
        raise NotImplementedError

    def check_values(self, target, outputs, what="target"):
        """Value checks that need the data on the host (label range); the Trainer runs them once. ``target``
        is as given (``prepare_targets`` has accepted it): a conversion would change the values an error
        names (uint64 labels of 2**63 or more wrap to negative int64, 1e39 rounds to inf in float32)."""

    def forward(self, y, target):
        """The mean loss of outputs ``y`` against ``target``; also computes the gradient."""
        ops = self._ops(y)
        if y.ndim != 2 or y.dtype.kind != "f":
            raise ShapeError(f"loss input y must be a 2-D float array (batch, outputs), got "
                             f"shape {tuple(y.shape)} dtype {y.dtype}")
        ops.check(target, "target")
        prepared = self.prepare_targets(ops, target, y.shape[1], y.dtype)
        if prepared.shape[0] != y.shape[0]:
            raise ShapeError(f"target has {prepared.shape[0]} rows but y has {y.shape[0]}")
        if not y.shape[0]:
            raise ShapeError("y has no rows: an empty batch has no mean loss")
        if ops.name == "cpu":  # free on the host; on a GPU it would synchronise every call
            self.check_values(target, y.shape[1])
        with ops.activate():
            return self._forward(ops, y, prepared)

    def backward(self):
        """The gradient of the last ``forward``'s loss by ``y``: the loss's own buffer, which the next
        ``forward`` overwrites (copy it to keep it)."""
        if self._grad is None:
            raise ShapeError("loss.backward() called before loss.forward()")
        return self._grad

    def count_correct(self, ops, y, target):
        """Correctly classified samples in the batch (prepared targets), as a device scalar."""
        return ops.count_correct(y, target)

    def config(self):
        """The settings, named by the class: a subclass with options adds its own (a CUDA graph of the step, which
        holds them as numbers, is captured again when one changes, as when an attribute of a plain value does)."""
        return {"type": type(self).__name__}


def _float_targets(target, outputs, dtype, what):
    """Float targets of shape (n, outputs); a 1-D target fits a single output."""
    if target.ndim == 1 and outputs == 1:
        target = target.reshape(-1, 1)
    if target.ndim != 2 or target.shape[1] != outputs:
        raise ShapeError(f"{what} has shape {tuple(target.shape)} but the model has {outputs} outputs; "
                         f"expected (samples, {outputs})")
    if target.dtype.kind not in "fiub":
        raise ShapeError(f"{what} has dtype {target.dtype}; expected numbers")
    return target.astype(dtype, copy=False)


def _are_labels(target, outputs):
    """Whether ``target`` holds integer class labels for a loss that takes rows of ``outputs`` values."""
    return target.ndim == 1 and target.dtype.kind in "iu" and outputs > 1


def _one_hot_or_float_targets(ops, target, outputs, dtype, what):
    """Integer labels as one-hot rows, any other target as ``_float_targets``."""
    if not _are_labels(target, outputs):
        return _float_targets(target, outputs, dtype, what)
    # An out-of-range label would be an all-zero row. The check needs the labels on the host: the Trainer
    # prepares a data set once; a direct forward() with integer labels on a GPU pays it each call.
    check_labels(ops.to_host(target), outputs, what)
    return one_hot(ops, target, outputs, dtype)


class SoftmaxCrossEntropy(Loss):
    """Softmax of the logits, then cross-entropy with integer class labels."""

    name = "softmax_cross_entropy"

    def prepare_targets(self, ops, target, outputs, dtype, what="labels"):
        if target.ndim != 1:
            one_hot_rows = f" (one-hot rows? pass {_code_name(what)}.argmax(axis=1))" \
                if target.shape[1:] == (outputs,) else ""
            raise ShapeError(f"{what} {_agree(what, 'has', 'have')} shape {tuple(target.shape)}; expected a 1-D "
                             f"array of class indices{one_hot_rows}")
        if target.dtype.kind not in "iu":
            _refuse_label_dtype(target, what)
        return target.astype(numpy.int64, copy=False)  # what the kernels index with

    def check_values(self, target, outputs, what="labels"):
        check_labels(get_backend(array_device(target)).to_host(target), outputs, what)

    def _forward(self, ops, y, target):
        return ops.softmax_cross_entropy(y, target, self._grad_buffer(ops, y))


class MeanSquaredError(Loss):
    """Mean of the squared differences over all elements; integer labels become one-hot."""

    name = "mse"

    def prepare_targets(self, ops, target, outputs, dtype, what="target"):
        return _one_hot_or_float_targets(ops, target, outputs, dtype, what)

    def _forward(self, ops, y, target):
        return ops.mse(y, target, self._grad_buffer(ops, y))

    def count_correct(self, ops, y, target):
        """Rows whose largest output is the target's; with one output, rows on the target's side of 0.5
        (Keras's binary accuracy: argmax of one column would count every row)."""
        if y.shape[1] == 1:
            return ((y > 0.5) == (target > 0.5)).sum()
        return ops.count_correct(y, target.argmax(axis=1))


class SigmoidCrossEntropy(Loss):
    """Binary cross-entropy on logits (PyTorch's BCEWithLogitsLoss), targets in [0, 1]; integer labels
    become one-hot (one-vs-rest: each output a binary classifier of its class)."""

    name = "sigmoid_cross_entropy"

    def prepare_targets(self, ops, target, outputs, dtype, what="target"):
        return _one_hot_or_float_targets(ops, target, outputs, dtype, what)

    def check_values(self, target, outputs, what="target"):
        if _are_labels(target, outputs):  # checked, and made one-hot, by prepare_targets
            return
        target = get_backend(array_device(target)).to_host(target)
        if target.size and (target.min() < 0 or target.max() > 1):
            raise ShapeError(f"{what} {_agree(what, 'ranges', 'range')} from {target.min():g} to {target.max():g}; "
                             f"binary cross-entropy takes targets in [0, 1]")

    def _forward(self, ops, y, target):
        return ops.sigmoid_cross_entropy(y, target, self._grad_buffer(ops, y))

    def count_correct(self, ops, y, target):
        """Elementwise accuracy of ``y > 0`` against the targets, counted per sample."""
        return ((y > 0) == (target > 0.5)).sum() / y.shape[1]


def one_hot(ops, labels, classes, dtype):
    """A (batch, classes) one-hot array from integer labels."""
    xp = ops.xp
    return (labels[:, None] == xp.arange(classes)).astype(dtype)


def check_labels(labels, classes, what="labels"):
    """Integer labels in ``[0, classes)``, on the host; a clear error otherwise."""
    labels = numpy.asarray(labels)
    if labels.dtype.kind not in "iu":
        _refuse_label_dtype(labels, what)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        binary = classes == 1 and labels.min() >= 0 and labels.max() == 1
        raise ShapeError(f"{what} {_agree(what, 'ranges', 'range')} from {labels.min()} to {labels.max()} but the "
                         f"output layer has {classes} unit{'s' * (classes != 1)}: labels must be in [0, {classes - 1}]"
                         + (" (one output is a binary classifier: train it with loss='sigmoid_cross_entropy', or "
                            "give the output layer 2 units)" if binary else ""))
    return labels


def _agree(what, singular, plural):
    """The verb that agrees with an array's name: "y has", "labels have"."""
    return plural if what.endswith("s") else singular


def _code_name(what):
    """The array's name as a hint's code uses it: "validation y" is the user's y."""
    return what.split()[-1]


def _refuse_label_dtype(labels, what):
    """The error for class labels that are not integers, with the fix when they are whole numbers."""
    whole = labels.dtype.kind == "f" and bool((labels == labels.round()).all())  # only on this error path
    hint = f" (whole numbers? pass {_code_name(what)}.astype(int))" if whole else ""
    raise ShapeError(f"{what} {_agree(what, 'has', 'have')} dtype {labels.dtype}; expected integer class "
                     f"indices{hint}")


LOSSES = {cls.name: cls for cls in (SoftmaxCrossEntropy, MeanSquaredError, SigmoidCrossEntropy)}
# PyTorch's functional names and Keras's for the same computations (logits in, as here)
ALIASES = {"cross_entropy": "softmax_cross_entropy", "binary_cross_entropy_with_logits": "sigmoid_cross_entropy",
           "mean_squared_error": "mse"}
# Keras's losses that take probabilities by default, and what here takes logits instead
_FROM_LOGITS = {"sparse_categorical_crossentropy": "softmax_cross_entropy (logits and class indices: Keras's "
                                                   "sparse_categorical_crossentropy with from_logits=True)",
                "categorical_crossentropy": "softmax_cross_entropy (logits and class indices, not one-hot rows)",
                "binary_crossentropy": "sigmoid_cross_entropy (logits: Keras's binary_crossentropy with "
                                       "from_logits=True)"}
MSE = MeanSquaredError


def saved_name(loss):
    """The name a checkpoint keeps of ``loss``, or a ConfigError for a loss of one's own (a subclass trains), which
    a run resumed from it could not rebuild."""
    check_saveable(loss, LOSSES.values(), "loss", ", ".join(LOSSES))
    return loss.name


def get(loss=None):
    """A loss from a name (or PyTorch's or Keras's for it), an instance, or None (softmax cross-entropy)."""
    if loss is None:
        return SoftmaxCrossEntropy()
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, type):
        raise ConfigError(f"loss must be a loss object such as nn.SoftmaxCrossEntropy() or its name, got "
                          f"{described(loss)}")
    name = loss.lower() if isinstance(loss, str) else None
    name = ALIASES.get(name, name)
    if name in LOSSES:
        return LOSSES[name]()
    hint = f" (the output layer is linear here: use {_FROM_LOGITS[name]})" if name in _FROM_LOGITS else ""
    raise ConfigError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}, or PyTorch's and Keras's names for "
                      f"them: {', '.join(ALIASES)}{hint}")
