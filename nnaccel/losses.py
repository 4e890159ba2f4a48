"""Losses: the mean over a batch, with the gradient computed in the same pass.

``forward(y, target)`` returns the loss as a device scalar (a 0-d CuPy array
on a GPU, a NumPy scalar on the CPU; read it with ``float()`` when you need
it: that synchronises a GPU); ``backward()`` returns the gradient w.r.t.
``y`` computed during ``forward``.
"""

import numpy

from .backend import array_device, get_backend
from .errors import ConfigError, ShapeError


class Loss:
    """Base class: validates shapes, keeps a reusable gradient buffer."""

    name = ""
    integer_targets = False  # targets are class indices, not arrays like y

    def __init__(self):
        self._grad = None
        self._computed = None

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

    def check(self, ops, y, target):
        """Shape and dtype checks that need no device synchronisation."""
        ops.check(target, "target")
        if y.ndim != 2 or y.dtype.kind != "f":
            raise ShapeError(f"loss input y must be a 2-D float array (batch, outputs), got "
                             f"shape {tuple(y.shape)} dtype {y.dtype}")
        if not self.integer_targets and tuple(target.shape) != tuple(y.shape):
            raise ShapeError(f"target has shape {tuple(target.shape)} but y has {tuple(y.shape)}")

    def forward(self, y, target):
        ops = self._ops(y)
        target = self.prepare(ops, y, target)
        self.check(ops, y, target)
        if ops.name == "cpu":
            self.check_values(ops, target, y.shape[1])
        return self._forward(ops, y, target)

    def prepare(self, ops, y, target):
        """Adapt targets given in a convenient form (e.g. class indices) to ``y``."""
        return target

    def check_values(self, ops, target, outputs):
        """Value checks (label range); the Trainer runs them once per data set."""

    def backward(self):
        if self._grad is None:
            raise ShapeError("loss.backward() called before loss.forward()")
        return self._grad

    def count_correct(self, y, target):
        """Correctly classified samples in the batch, as a 0-d device array."""
        return self._ops(y).count_correct(y, target)

    def config(self):
        return {"type": type(self).__name__}


class SoftmaxCrossEntropy(Loss):
    """Softmax of the logits, then cross-entropy with integer class labels."""

    name = "softmax_cross_entropy"
    integer_targets = True

    def check(self, ops, y, target):
        super().check(ops, y, target)
        if target.ndim != 1 or target.shape[0] != y.shape[0]:
            raise ShapeError(f"labels have shape {tuple(target.shape)} but y has {y.shape[0]} rows; "
                             f"expected labels of shape ({y.shape[0]},)")
        if target.dtype.kind not in "iu":
            raise ShapeError(f"labels have dtype {target.dtype}; expected integer class indices")

    def check_values(self, ops, target, outputs):
        check_labels(ops.to_host(target), outputs, "labels")

    def _forward(self, ops, y, target):
        return ops.softmax_cross_entropy(y, target, self._grad_buffer(ops, y))


class MeanSquaredError(Loss):
    """Mean of the squared differences over all elements; integer labels become one-hot."""

    name = "mse"

    def prepare(self, ops, y, target):
        if target.ndim == 1 and target.dtype.kind in "iu" and y.ndim == 2 and y.shape[1] > 1:
            return one_hot(ops, target, y.shape[1], y.dtype)
        if target.ndim == 1 and y.ndim == 2 and y.shape[1] == 1:
            return target.reshape(-1, 1)
        return target

    def _forward(self, ops, y, target):
        return ops.mse(y, target, self._grad_buffer(ops, y))

    def count_correct(self, y, target):
        ops = self._ops(y)
        target = self.prepare(ops, y, target)
        return ops.count_correct(y, target.argmax(axis=1))


class SigmoidCrossEntropy(Loss):
    """Binary cross-entropy on logits (PyTorch's BCEWithLogitsLoss), targets in [0, 1]."""

    name = "sigmoid_cross_entropy"

    def prepare(self, ops, y, target):
        if target.ndim == 1 and y.ndim == 2 and y.shape[1] == 1:
            target = target.reshape(-1, 1)
        if target.dtype != y.dtype:
            target = target.astype(y.dtype)
        return target

    def _forward(self, ops, y, target):
        return ops.sigmoid_cross_entropy(y, target, self._grad_buffer(ops, y))

    def count_correct(self, y, target):
        """Elementwise accuracy of ``y > 0`` against the targets, counted per sample."""
        target = self.prepare(self._ops(y), y, target)
        return ((y > 0) == (target > 0.5)).sum() / y.shape[1]


def one_hot(ops, labels, classes, dtype):
    """A (batch, classes) one-hot array from integer labels."""
    xp = ops.xp
    return (labels[:, None] == xp.arange(classes)).astype(dtype)


def check_labels(labels, classes, what="labels"):
    """Integer labels in ``[0, classes)``, on the host; a clear error otherwise."""
    labels = numpy.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ShapeError(f"{what} have dtype {labels.dtype}; expected integer class indices")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ShapeError(f"{what} range from {labels.min()} to {labels.max()} but the output layer has "
                         f"{classes} units: labels must be in [0, {classes - 1}]")
    return labels


LOSSES = {cls.name: cls for cls in (SoftmaxCrossEntropy, MeanSquaredError, SigmoidCrossEntropy)}
MSE = MeanSquaredError
BCEWithLogits = SigmoidCrossEntropy


def get(loss=None):
    """A loss from a name, an instance, or None (softmax cross-entropy)."""
    if loss is None:
        return SoftmaxCrossEntropy()
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss.lower() in LOSSES:
        return LOSSES[loss.lower()]()
    raise ConfigError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
