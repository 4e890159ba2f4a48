"""nnaccel.special.erf against the C library's erf (Python's math.erf), and GELU without SciPy."""

import math
import subprocess
import sys

import numpy
import pytest

from nnaccel.special import erf

# Where s_erf.c switches formula: 2**-28, 0.84375, 1.25, 1/0.35, the end it really uses just above, 6.
BOUNDARIES = [2.0 ** -28, 0.84375, 1.25, 1 / 0.35, float.fromhex("0x1.6db6ep+1"), 6.0]
SPECIAL = [0.0, -0.0, math.inf, -math.inf, math.nan]


def _points(dtype):
    """A dense sweep of [-7, 7], magnitudes from the smallest subnormal to 1e300 (or the
    largest finite value) of both signs, the interval ends with their neighbours, special values."""
    info = numpy.finfo(dtype)
    magnitudes = numpy.geomspace(info.smallest_subnormal, min(1e300, float(info.max)), 20_000, dtype=dtype)
    ends = numpy.array(BOUNDARIES, dtype=dtype)
    ends = numpy.concatenate([ends, numpy.nextafter(ends, dtype(0)), numpy.nextafter(ends, dtype(numpy.inf))])
    return numpy.concatenate([numpy.linspace(-7, 7, 200_001, dtype=dtype), magnitudes, -magnitudes,
                              ends, -ends, numpy.array(SPECIAL, dtype=dtype)])


def _ulp_errors(got, reference):
    """|got - reference| in ulps of the reference (both of one dtype; NaN where the reference is NaN)."""
    return (numpy.abs(got.astype(numpy.float64) - reference.astype(numpy.float64))
            / numpy.spacing(numpy.abs(reference)).astype(numpy.float64))


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_within_one_ulp_of_libm(dtype):
    x = _points(dtype)
    # math.erf of the exact input, rounded once to the input's dtype
    reference = numpy.array([math.erf(value) for value in x.tolist()]).astype(dtype)
    got = erf(x)
    assert got.dtype == dtype
    finite = ~numpy.isnan(reference)
    errors = _ulp_errors(got[finite], reference[finite])
    worst = int(numpy.argmax(errors))
    assert errors[worst] <= 1.0, f"{errors[worst]} ulp at x = {x[finite][worst]!r}"
    assert numpy.isnan(got[~finite]).all()


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_special_values(dtype):
    got = erf(numpy.array(SPECIAL, dtype=dtype))
    assert got.dtype == dtype
    numpy.testing.assert_array_equal(got, [0.0, -0.0, 1.0, -1.0, math.nan])
    assert not numpy.signbit(got[0]) and numpy.signbit(got[1])


@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32, numpy.float64])
def test_keeps_dtype_and_shape(dtype):
    x = numpy.linspace(-3, 3, 24).reshape(2, 3, 4).astype(dtype)
    got = erf(x[:, :, ::2])  # a strided view
    assert got.dtype == dtype and got.shape == (2, 3, 2)
    numpy.testing.assert_array_equal(got, erf(x[:, :, ::2].copy()))


def test_integers_and_scalars_give_float64():
    assert erf(numpy.arange(3)).dtype == numpy.float64
    assert erf(0.5) == math.erf(0.5) and isinstance(erf(0.5), numpy.float64)


def test_out():
    x = numpy.linspace(-7, 7, 1001, dtype=numpy.float32)
    out = numpy.empty_like(x)
    assert erf(x, out=out) is out
    numpy.testing.assert_array_equal(out, erf(x))
    wide = numpy.empty(x.shape)  # cast into a wider array, as a ufunc would
    erf(x, out=wide)
    numpy.testing.assert_array_equal(wide, erf(x))


def test_gelu_training_on_cpu_needs_no_scipy():
    script = """
import sys
sys.modules["scipy"] = None  # any import of scipy now fails
import numpy
import nnaccel

model = nnaccel.Sequential(nnaccel.Dense(4, 3, activation="gelu"), nnaccel.Dense(3, 2))
rng = numpy.random.default_rng(0)
x, y = rng.standard_normal((32, 4)).astype(numpy.float32), rng.integers(0, 2, 32)
assert numpy.isfinite(model.forward(x)).all()
history = nnaccel.Trainer(model, batch_size=8, quiet=True).fit(x, y, epochs=1)
assert numpy.isfinite(history["loss"]).all()
assert [name for name, module in sys.modules.items() if name.startswith("scipy") and module] == []
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
