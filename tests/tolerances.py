"""How far two correct computations of a network's output may differ, from what the arithmetic guarantees.

BLAS promises no summation order: the same rows predicted in batches of
other sizes go through other kernels and may differ in their last bits. Any
order of a K-term dot product is within ``gamma_K = K u / (1 - K u)`` of the
exact one, relative to ``sum |a_i| |b_i|`` (Higham, *Accuracy and Stability
of Numerical Algorithms*, 2nd ed., eq. 3.5), ``u`` being the unit roundoff.
``output_bound`` carries that bound through the layers (each activation
scales an input error by at most its Lipschitz constant and adds a few ulps
of its own); two computations then differ by at most twice the bound.
"""

import numpy

import nnaccel as nn

LIPSCHITZ = {"linear": 1.0, "relu": 1.0, "sigmoid": 0.25, "tanh": 1.0, "softplus": 1.0, "gelu": 1.13, "silu": 1.1,
             "softmax": 2.0}
ACTIVATION_ULPS = 8  # the math library's own error in an activation, in units of roundoff


def gamma(k, dtype):
    u = numpy.finfo(dtype).eps / 2
    return k * u / (1 - k * u)


def _host(model, array):
    return numpy.asarray(model.backend.to_host(array), dtype=numpy.float64)


def _lipschitz(activation):
    if activation.name == "leaky_relu":
        return max(1.0, activation.slope)
    if activation.name == "elu":
        return max(1.0, activation.alpha)
    return LIPSCHITZ[activation.name]


def output_bound(model, x):
    """Elementwise bound on |output - exact output| of ``model`` (eval mode) for host rows ``x``."""
    u = numpy.finfo(model.dtype).eps / 2
    h = numpy.asarray(x, dtype=numpy.float64)
    error = numpy.zeros_like(h)
    for layer in model.layers:
        if isinstance(layer, nn.Dropout):
            continue
        weight, bias = (_host(model, layer.params[name].data) for name in ("weight", "bias"))
        weight = weight.reshape(layer.in_features, -1)
        z = h @ weight + bias.ravel()
        z_error = error @ numpy.abs(weight) + gamma(layer.in_features + 1, model.dtype) * (
            numpy.abs(h) @ numpy.abs(weight) + numpy.abs(bias.ravel()))
        if isinstance(layer, nn.Maxout):
            pieces = (h.shape[0], layer.out_features, layer.pieces)
            h, error = z.reshape(pieces).max(axis=2), z_error.reshape(pieces).max(axis=2)
            continue
        y = _host(model, layer.activation.forward(model.backend, model.backend.asarray(z.astype(model.dtype)),
                                                  model.backend.empty(z.shape, model.dtype)))
        error = _lipschitz(layer.activation) * z_error + ACTIVATION_ULPS * u * (numpy.abs(y) + numpy.finfo(model.dtype).tiny)
        h = y
    return error


def difference_bound(model, x):
    """Elementwise bound on how far two correct computations of ``model``'s output for ``x`` may differ."""
    return 2 * output_bound(model, x)


def softmax_difference_bound(probabilities, logit_difference):
    """Bound on how far softmax probabilities differ when each logit of a row may move by the bound given:
    every probability scales by at most ``exp(2 max_j |dz_j|)``."""
    spread = numpy.max(logit_difference, axis=-1, keepdims=True)
    return numpy.asarray(probabilities) * numpy.expm1(2 * spread) + 8 * numpy.finfo(numpy.float64).eps


def assert_within(actual, expected, bound, what="outputs"):
    actual, expected = numpy.asarray(actual, dtype=numpy.float64), numpy.asarray(expected, dtype=numpy.float64)
    excess = numpy.abs(actual - expected) - bound
    worst = numpy.unravel_index(numpy.argmax(excess), excess.shape) if excess.size else ()
    assert not (excess > 0).any(), (f"{what} differ by more than rounding allows: at {worst} {actual[worst]!r} vs "
                                    f"{expected[worst]!r}, bound {bound[worst]!r}")
