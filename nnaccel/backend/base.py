"""The base backend: every op written once against an array module ``xp``.

Subclasses bind ``xp`` (NumPy or CuPy) and override only the ops they do
faster; an override keeps the base signature (a test checks it). Ops write
into preallocated outputs (``out=``) so a training step allocates little.
"""

import contextlib
import math

import numpy

from ..errors import DeviceError


def array_device(array):
    """``"cpu"`` for a NumPy array, ``"cuda:N"`` for a CuPy one, None otherwise."""
    if isinstance(array, numpy.ndarray):
        return "cpu"
    if type(array).__module__.startswith("cupy"):
        return f"cuda:{array.device.id}"
    return None


def _mix32(x, xp):
    """Wellons' lowbias32 integer hash over a uint32 array (in place)."""
    x ^= x >> 16
    x *= xp.uint32(0x7FEB352D)
    x ^= x >> 15
    x *= xp.uint32(0x846CA68B)
    x ^= x >> 16
    return x


class Backend:
    """Generic ops over ``self.xp``; one instance per device."""

    xp = None
    name = ""

    def __init__(self):
        self._scratch_arrays = {}

    # ----- arrays and transfers -------------------------------------------------
    def asarray(self, array, dtype=None, what="array"):
        """``array`` on this device (host arrays are copied over once).

        Arrays already on another device are refused with both device names:
        moving them silently would hide a copy in a hot loop.
        """
        where = array_device(array)
        if where not in (None, "cpu", self.name):
            raise DeviceError(f"{what} is on {where} but the model is on {self.name}")
        return self.xp.asarray(array, dtype=dtype)

    def check(self, array, what="array"):
        """Raise a DeviceError unless ``array`` lives on this device."""
        where = array_device(array)
        if where != self.name:
            found = where or type(array).__name__
            raise DeviceError(f"{what} is on {found} but the model is on {self.name}; "
                              f"move it with model.backend.asarray(...)")
        return array

    def to_host(self, array):
        """A NumPy copy: later device work (reused buffers) cannot change it."""
        return numpy.array(array)

    def empty(self, shape, dtype=numpy.float32):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype=numpy.float32):
        return self.xp.zeros(shape, dtype=dtype)

    def synchronize(self):
        """Wait for queued device work; a no-op where work is synchronous."""

    def activate(self):
        """A context in which the array module works on this device (every public entry point
        enters it, so that ``cuda:1`` computes on GPU 1, not on the current device)."""
        return contextlib.nullcontext()

    def erf(self, x):
        raise NotImplementedError

    def memory_report(self, error, batch_size):
        """What to tell a user whose training ran out of memory."""
        return (f"out of memory on {self.name} during training with batch size {batch_size} ({error}); "
                f"try a smaller --batch-size or a smaller network")

    # ----- layers ---------------------------------------------------------------
    def matmul(self, a, b, out, trans_a=False, trans_b=False):
        """The batched weighted sum ``out = op(a) @ op(b)``; transposes are views."""
        return self.xp.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)

    def bias_act(self, z, bias, activation, out):
        """``z += bias`` then ``out = activation(z)``; ``out`` may be ``z``."""
        self.xp.add(z, bias, out=z)
        return activation.forward(self, z, out)

    def act_backward(self, dy, y, z, activation, out, bias_grad=None):
        """``out = dy * activation'(.)``, and the bias gradient (batch sum) when asked."""
        activation.backward(self, dy, y, z, out)
        if bias_grad is not None:
            self.bias_grad(out, bias_grad)
        return out

    def bias_grad(self, dz, out):
        """Sum of ``dz`` over the batch, into ``out``."""
        return dz.sum(axis=0, out=out)

    def softmax(self, z, out):
        """Row-wise softmax, shifted by the row maximum for stability."""
        xp = self.xp
        xp.subtract(z, z.max(axis=1, keepdims=True), out=out)
        xp.exp(out, out=out)
        out /= out.sum(axis=1, keepdims=True)
        return out

    def softmax_backward(self, dy, y, out):
        """The softmax Jacobian times ``dy``: ``y * (dy - sum(dy * y))`` per row."""
        inner = (dy * y).sum(axis=1, keepdims=True)
        return self.xp.multiply(y, dy - inner, out=out)

    def maxout_forward(self, z3, out, index):
        """Max over the last axis of ``z3`` (batch, units, pieces) and its index."""
        index[...] = z3.argmax(axis=2)
        return z3.max(axis=2, out=out)

    def maxout_backward(self, dy, index, out3):
        """Route ``dy`` to the winning piece; the other pieces get zero."""
        xp = self.xp
        pieces = xp.arange(out3.shape[2], dtype=index.dtype)
        xp.multiply(pieces == index[..., None], dy[..., None], out=out3)
        return out3

    def dropout_mask(self, shape, rate, seed, counter, dtype):
        """A scaled keep-mask: 0 with probability ``rate``, else ``1/(1-rate)``."""
        keep = self.uniform(shape, seed, counter) >= rate
        return keep.astype(dtype) * (1.0 / (1.0 - rate))

    # ----- losses ----------------------------------------------------------------
    def softmax_cross_entropy(self, logits, labels, grad):
        """Mean cross-entropy of softmax(logits) and its gradient, in one pass.

        ``grad`` receives ``(softmax - onehot) / batch``; returns a 0-d array.
        """
        xp = self.xp
        batch = logits.shape[0]
        rows = xp.arange(batch)
        xp.subtract(logits, logits.max(axis=1, keepdims=True), out=grad)
        picked = grad[rows, labels]
        xp.exp(grad, out=grad)
        total = grad.sum(axis=1)
        loss = (xp.log(total) - picked).mean()
        grad /= total[:, None]
        grad[rows, labels] -= 1.0
        grad *= 1.0 / batch
        return loss

    def mse(self, y, target, grad):
        """Mean squared error over all elements and its gradient."""
        self.xp.subtract(y, target, out=grad)
        loss = (grad * grad).mean()
        grad *= 2.0 / grad.size
        return loss

    def sigmoid_cross_entropy(self, logits, target, grad):
        """Binary cross-entropy on logits (stable form) and its gradient."""
        xp = self.xp
        loss = (xp.maximum(logits, 0) - logits * target + xp.log1p(xp.exp(-xp.abs(logits)))).mean()
        xp.multiply(logits, 0.5, out=grad)
        xp.tanh(grad, out=grad)
        grad *= 0.5
        grad += 0.5
        grad -= target
        grad *= 1.0 / grad.size
        return loss

    def count_correct(self, y, labels):
        """How many rows of ``y`` have their maximum at ``labels`` (0-d array)."""
        return (y.argmax(axis=1) == labels).sum()

    # ----- optimizers --------------------------------------------------------------
    def _scratch(self, like, slot):
        """Work array number ``slot`` shaped like ``like``, kept between calls, so that an
        optimizer step over millions of parameters allocates (and page-faults) nothing."""
        key = (slot, like.shape, like.dtype)
        if key not in self._scratch_arrays:
            self._scratch_arrays[key] = self.xp.empty_like(like)
        return self._scratch_arrays[key]

    def sgd_update(self, param, grad, velocity, lr, momentum, weight_decay, nesterov):
        """PyTorch's SGD step over flat buffers, in place.

        ``velocity`` starts at zero, which equals PyTorch's first-step copy.
        """
        xp = self.xp
        step, work = grad, self._scratch(param, 0)
        if weight_decay:  # step = grad + weight_decay * param
            step = xp.multiply(param, weight_decay, out=self._scratch(param, 1))
            step += grad
        if momentum:
            velocity *= momentum
            velocity += step
            if nesterov:  # step = step + momentum * velocity
                xp.multiply(velocity, momentum, out=work)
                step = xp.add(step, work, out=self._scratch(param, 1))
            else:
                step = velocity
        param -= xp.multiply(step, lr, out=work)
        return param

    def adam_update(self, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step):
        """PyTorch's Adam (``decoupled=False``) or AdamW step over flat buffers, in place."""
        xp = self.xp
        work, denom = self._scratch(param, 0), self._scratch(param, 1)
        if weight_decay and decoupled:
            param *= 1.0 - lr * weight_decay
        elif weight_decay:  # grad + weight_decay * param, kept in denom until denom is needed
            grad = xp.add(xp.multiply(param, weight_decay, out=denom), grad, out=denom)
        m *= beta1
        m += xp.multiply(grad, 1.0 - beta1, out=work)
        v *= beta2
        xp.multiply(grad, grad, out=work)
        v += xp.multiply(work, 1.0 - beta2, out=work)
        xp.sqrt(v, out=denom)
        denom *= 1.0 / math.sqrt(1.0 - beta2 ** step)
        denom += eps
        xp.divide(m, denom, out=work)
        param -= xp.multiply(work, lr / (1.0 - beta1 ** step), out=work)
        return param

    # ----- random numbers ------------------------------------------------------------
    def uniform(self, shape, seed, counter):
        """Counter-based uniform floats in [0, 1): a pure function of (seed, counter).

        The same numbers on every device, and the state to checkpoint is one
        integer, so resumed runs draw exactly what an uninterrupted run would.
        """
        xp = self.xp
        size = math.prod(shape)
        key_lo = (seed * 0x9E3779B9 + counter * 0x85EBCA6B) & 0xFFFFFFFF
        key_hi = (counter * 0xC2B2AE35 + seed + 0x27D4EB2F) & 0xFFFFFFFF
        x = xp.arange(size, dtype=xp.uint32)
        x += xp.uint32(key_lo)
        _mix32(x, xp)
        x ^= xp.uint32(key_hi)
        _mix32(x, xp)
        x >>= 8
        return (x.astype(xp.float32) * (1.0 / (1 << 24))).reshape(shape)
