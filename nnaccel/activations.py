"""Activation functions and their derivatives, written once against a backend.

Each activation computes ``y = f(z)`` and ``dz = dy * f'(z)``. Where the math
allows, the derivative is written in terms of the saved output ``y`` (as
Chainer does), so a layer keeps one array instead of two; ``uses_output``
says which. The same formulas live in ``kernels/activations.cuh`` for the GPU,
under the same integer ``code``.

All functions write into a preallocated ``out`` (which may alias ``z``) and
keep the input dtype: scalars are Python floats, which NumPy and CuPy treat
as weak, so float32 stays float32.
"""

import math

from .errors import ConfigError, check_number, described


class Activation:
    """Base class: ``forward`` and ``backward`` over the backend ``ops``."""

    name = ""
    code = -1
    uses_output = True
    init = "glorot"  # initialisation that suits the activation
    param = 0.0

    def forward(self, ops, z, out):
        raise NotImplementedError

    def backward(self, ops, dy, y, z, out):
        raise NotImplementedError

    def config(self):
        """The keyword arguments that rebuild this activation with ``get``."""
        return {}

    def has_defaults(self):
        """Whether its name alone rebuilds it (its options, if any, are the defaults)."""
        return self == type(self)()

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.config() == other.config()

    def __hash__(self):
        return hash((type(self), tuple(sorted(self.config().items()))))


class Linear(Activation):
    """The identity: no activation (PyTorch's nn.Linear, a fully connected layer, is nn.Dense here)."""

    name, code = "linear", 0

    def __init__(self, *args):
        if args:  # a PyTorch user's nn.Linear(784, 10)
            shown = ", ".join(map(repr, args))
            raise ConfigError(f"nn.Linear is the identity activation and takes no arguments: PyTorch's "
                              f"nn.Linear({shown}), a fully connected layer, is nn.Dense({shown}) here")

    def forward(self, ops, z, out):
        if out is not z:
            out[...] = z
        return out

    def backward(self, ops, dy, y, z, out):
        if out is not dy:
            out[...] = dy
        return out


class ReLU(Activation):
    name, code, init = "relu", 1, "he"

    def forward(self, ops, z, out):
        return ops.relu(z, out)

    def backward(self, ops, dy, y, z, out):
        xp = ops.xp
        return xp.multiply(dy, y > 0, out=out)


class LeakyReLU(Activation):
    name, code, init = "leaky_relu", 2, "he"

    def __init__(self, slope=0.01):
        self.param = self.slope = check_number(slope, "leaky_relu slope", allow_zero=True)

    def config(self):
        return {"slope": self.slope}

    def forward(self, ops, z, out):
        out[...] = ops.xp.where(z > 0, z, z * self.slope)
        return out

    def backward(self, ops, dy, y, z, out):
        out[...] = ops.xp.where(y > 0, dy, dy * self.slope)
        return out


class ELU(Activation):
    name, code, init = "elu", 3, "he"

    def __init__(self, alpha=1.0):
        self.param = self.alpha = check_number(alpha, "elu alpha")

    def config(self):
        return {"alpha": self.alpha}

    def forward(self, ops, z, out):
        # max(z, 0) + alpha * expm1(min(z, 0)): one branch is always exactly 0.
        xp = ops.xp
        negative = xp.minimum(z, 0)
        xp.expm1(negative, out=negative)
        negative *= self.alpha
        ops.relu(z, out)
        return xp.add(out, negative, out=out)

    def backward(self, ops, dy, y, z, out):
        """``f'(z) = y + alpha`` below 0, from the output, as PyTorch's in-place ELU does: where alpha * e^z
        falls under y's last bit (z below about -10 in float32) that loses relative accuracy, never more
        than alpha * 2^-24 absolute."""
        xp = ops.xp
        return xp.multiply(dy, xp.where(y > 0, 1.0, y + self.alpha), out=out)


class Sigmoid(Activation):
    """The logistic function ``1 / (1 + e^-z)``, in the backend's stable form (``Backend.sigmoid``)."""

    name, code = "sigmoid", 4

    def forward(self, ops, z, out):
        return ops.sigmoid(z, out)

    def backward(self, ops, dy, y, z, out):
        xp = ops.xp
        return xp.multiply(dy, y * (1.0 - y), out=out)


class Tanh(Activation):
    name, code = "tanh", 5

    def forward(self, ops, z, out):
        return ops.xp.tanh(z, out=out)

    def backward(self, ops, dy, y, z, out):
        return ops.xp.multiply(dy, 1.0 - y * y, out=out)


class Softplus(Activation):
    """``log(1 + e^z)`` in a stable form; its derivative ``sigmoid(z) = 1 - e^-y``."""

    name, code = "softplus", 6

    def forward(self, ops, z, out):
        xp = ops.xp
        tail = xp.log1p(xp.exp(-xp.abs(z)))
        ops.relu(z, out)
        return xp.add(out, tail, out=out)

    def backward(self, ops, dy, y, z, out):
        xp = ops.xp
        return xp.multiply(dy, -xp.expm1(-y), out=out)


class GELU(Activation):
    """Exact GELU, ``z * Phi(z)`` with the error function (PyTorch's default)."""

    name, code, init, uses_output = "gelu", 7, "he", False

    @staticmethod
    def _normal_cdf(ops, z):
        """``Phi(z) = (1 + erf(z / sqrt 2)) / 2``, a new array."""
        cdf = ops.erf(z * (1.0 / math.sqrt(2.0)))
        cdf += 1.0
        cdf *= 0.5
        return cdf

    def forward(self, ops, z, out):
        return ops.xp.multiply(z, self._normal_cdf(ops, z), out=out)

    def backward(self, ops, dy, y, z, out):
        xp = ops.xp
        cdf = self._normal_cdf(ops, z)
        pdf = xp.exp(z * z * -0.5)
        pdf *= 1.0 / math.sqrt(2.0 * math.pi)
        pdf *= z
        pdf += cdf
        return xp.multiply(dy, pdf, out=out)


class SiLU(Activation):
    """``z * sigmoid(z)`` (swish); its derivative needs ``z``."""

    name, code, init, uses_output = "silu", 8, "he", False

    def forward(self, ops, z, out):
        s = ops.sigmoid(z, ops.xp.empty_like(z))
        return ops.xp.multiply(z, s, out=out)

    def backward(self, ops, dy, y, z, out):
        xp = ops.xp
        s = ops.sigmoid(z, xp.empty_like(z))
        grad = 1.0 - s
        grad *= z
        grad += 1.0
        grad *= s
        return xp.multiply(dy, grad, out=out)


class Softmax(Activation):
    """Row-wise softmax for an output layer; backward is the Jacobian product."""

    name, code = "softmax", 9

    def forward(self, ops, z, out):
        return ops.softmax(z, out)

    def backward(self, ops, dy, y, z, out):
        return ops.softmax_backward(dy, y, out)


ACTIVATIONS = {cls.name: cls for cls in
               (Linear, ReLU, LeakyReLU, ELU, Sigmoid, Tanh, Softplus, GELU, SiLU, Softmax)}


def get(activation=None, **params):
    """An activation from a name (``"relu"``), an instance, or None (linear)."""
    if activation is None:
        return Linear()
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        key = activation.lower().replace("-", "_")
        if key in ACTIVATIONS:
            try:
                return ACTIVATIONS[key](**params)
            except TypeError:
                raise ConfigError(f"activation {activation!r} takes no parameters {sorted(params)}") from None
        raise ConfigError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    raise ConfigError(f"activation must be a name ({', '.join(ACTIVATIONS)}) or an nnaccel activation such as "
                      f"nn.ReLU(), got {_described(activation)}")


def _described(value):
    """``value`` as a refused activation shows it: nnaccel's class (to call), another library's class or
    object with its module (PyTorch's ``torch.nn.ReLU()`` would read as nnaccel's ``ReLU()``)."""
    kind = value if isinstance(value, type) else type(value)
    if isinstance(value, type) and issubclass(value, Activation):
        return described(value)
    if kind.__module__.split(".")[0] in ("builtins", "numpy"):
        return described(value)
    name = f"{kind.__module__}.{kind.__qualname__}"
    return f"the class {name}" if isinstance(value, type) else f"a {name} object"


def from_text(text):
    """An activation as the command line spells it: ``NAME``, or ``NAME:VALUE`` for the one option of a
    parametrised activation (``leaky_relu:0.2`` is LeakyReLU(slope=0.2), ``elu:0.5`` ELU(alpha=0.5))."""
    name, colon, value = (part.strip() for part in text.partition(":"))
    activation = get(name)
    if not colon:
        return activation
    options = activation.config()
    if not options:
        takers = [f"{key}:{option.upper()}" for key, cls in ACTIVATIONS.items() for option in cls().config()]
        raise ConfigError(f"{name} takes no parameter; {' and '.join(takers)} take one")
    (option,) = options
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name}'s {option} must be a number, like {name}:{options[option]}, got {value!r}") from None
    return get(name, **{option: number})
