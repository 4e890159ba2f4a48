"""The error function on NumPy arrays, without SciPy, as GELU needs it.

``erf`` for float64 follows the rational approximations of FreeBSD's msun
``s_erf.c`` (Sun's fdlibm), which stay within 1 ulp; it is vectorised by
picking out the elements of each of that code's intervals.
Narrower floats are computed in float64 and rounded once, within 1 ulp too.
"""

import numpy

__all__ = ["erf"]

# Coefficients from msun s_erf.c.  EFX is 2/sqrt(pi) - 1; ERX is erf(1) rounded to float32.
EFX = 1.28379167095512586316e-01
ERX = 8.45062911510467529297e-01
# erf(x) = x + x * PP(x*x) / QQ(x*x) for |x| < 0.84375
PP = (1.28379167095512558561e-01, -3.25042107247001499370e-01, -2.84817495755985104766e-02,
      -5.77027029648944159157e-03, -2.37630166566501626084e-05)
QQ = (1.0, 3.97917223959155352819e-01, 6.50222499887672944485e-02, 5.08130628187576562776e-03,
      1.32494738004321644526e-04, -3.96022827877536812320e-06)
# erf(x) = ERX + PA(s) / QA(s), s = |x| - 1, for 0.84375 <= |x| < 1.25
PA = (-2.36211856075265944077e-03, 4.14856118683748331666e-01, -3.72207876035701323847e-01,
      3.18346619901161753674e-01, -1.10894694282396677476e-01, 3.54783043256182359371e-02,
      -2.16637559486879084300e-03)
QA = (1.0, 1.06420880400844228286e-01, 5.40397917702171048937e-01, 7.18286544141962662868e-02,
      1.26171219808761642112e-01, 1.36370839120290507362e-02, 1.19844998467991074170e-02)
# erfc(x) = exp(-x*x - 0.5625 + R(s) / S(s)) / x, s = 1/x**2: RA/SA below 1/0.35, RB/SB up to 6
RA = (-9.86494403484714822705e-03, -6.93858572707181764372e-01, -1.05586262253232909814e+01,
      -6.23753324503260060396e+01, -1.62396669462573470355e+02, -1.84605092906711035994e+02,
      -8.12874355063065934246e+01, -9.81432934416914548592e+00)
SA = (1.0, 1.96512716674392571292e+01, 1.37657754143519042600e+02, 4.34565877475229228821e+02,
      6.45387271733267880336e+02, 4.29008140027567833386e+02, 1.08635005541779435134e+02,
      6.57024977031928170135e+00, -6.04244152148580987438e-02)
RB = (-9.86494292470009928597e-03, -7.99283237680523006574e-01, -1.77579549177547519889e+01,
      -1.60636384855821916062e+02, -6.37566443368389627722e+02, -1.02509513161107724954e+03,
      -4.83519191608651397019e+02)
SB = (1.0, 3.03380607434824582924e+01, 3.25792512996573918826e+02, 1.53672958608443695994e+03,
      3.19985821950859553908e+03, 2.55305040643316442583e+03, 4.74528541206955367215e+02,
      -2.24409524465858183362e+01)

# Where each formula takes over.  s_erf.c compares the high 32 bits of |x|'s bit pattern, so
# its third end is 1/0.35 rounded up to a number whose low 32 bits are zero.
SMALL_START = 2.0 ** -28  # below it erf(x) = x + EFX * x, leaving out terms under 2**-84
NEAR_ONE_START = 0.84375
TAIL_START = 1.25
FAR_TAIL_START = float.fromhex("0x1.6db6ep+1")  # 2.8571434..., just above 1/0.35
SATURATION_START = 6.0  # erf(x) rounds to +-1 from here on


def erf(x, out=None):
    """The error function of ``x``, elementwise, within 1 ulp; keeps a floating dtype.

    Integer and boolean input gives float64; floats wider than float64 get
    float64's accuracy.  With ``out`` the result is written there (cast as
    a ufunc would) and ``out`` is returned.
    """
    x = numpy.asarray(x)
    if numpy.issubdtype(x.dtype, numpy.floating):
        dtype = x.dtype
    elif numpy.issubdtype(x.dtype, numpy.integer) or x.dtype == numpy.bool_:
        dtype = numpy.dtype(numpy.float64)
    else:
        raise TypeError(f"erf takes real numbers, not {x.dtype}")
    result = _erf64(x.astype(numpy.float64, copy=False)).astype(dtype, copy=False)
    if out is None:
        return result[()]
    numpy.copyto(out, result, casting="same_kind")
    return out


def _erf64(x):
    """erf of a float64 array, each element by the formula of its interval in s_erf.c.

    The formula for small ``|x|`` runs on every element (it is cheap, and
    most GELU inputs need it; NaN stays NaN through it), then the other
    intervals overwrite their elements: twice as fast as picking out the
    elements of every interval.  Floating-point warnings are off: the
    overflow of the small formula at large ``|x|`` is overwritten, and
    underflow is harmless (s_erf.c scales subnormal ``x`` by 8 only to keep
    the underflow flag down).
    """
    flat = x.ravel()
    magnitude = numpy.abs(flat)
    with numpy.errstate(all="ignore"):
        result = _erf_small(flat)
        for start, end, formula in [(0.0, SMALL_START, lambda t: t + EFX * t),
                                    (NEAR_ONE_START, TAIL_START, _erf_near_one),
                                    (TAIL_START, FAR_TAIL_START, lambda t: _erf_tail(t, RA, SA)),
                                    (FAR_TAIL_START, SATURATION_START, lambda t: _erf_tail(t, RB, SB))]:
            where = numpy.flatnonzero((magnitude >= start) & (magnitude < end))
            if where.size:
                result[where] = formula(flat[where])
    numpy.copyto(result, numpy.copysign(1.0, flat), where=magnitude >= SATURATION_START)
    return result.reshape(x.shape)


def _erf_small(x):
    """``x + x * P/Q`` in ``x*x``, for 2**-28 <= |x| < 0.84375."""
    z = x * x
    return x + x * (_polynomial(z, PP) / _polynomial(z, QQ))


def _erf_near_one(x):
    """``erf(1) + P/Q`` in ``|x| - 1``, for 0.84375 <= |x| < 1.25, where erf is flat."""
    s = numpy.abs(x) - 1.0
    return numpy.copysign(ERX + _polynomial(s, PA) / _polynomial(s, QA), x)


def _erf_tail(x, numerator, denominator):
    """``1 - erfc(|x|)`` with the sign of ``x``, for 1.25 <= |x| < 6.

    ``exp(-x*x)`` is taken as ``exp(-z*z) * exp((z - x) * (z + x))`` with ``z``
    the top 21 bits of ``x``: ``z*z`` is exact, so the large exponent carries
    no rounding error.
    """
    magnitude = numpy.abs(x)
    s = 1.0 / (magnitude * magnitude)
    fraction = _polynomial(s, numerator) / _polynomial(s, denominator)
    z = (magnitude.view(numpy.uint64) & numpy.uint64(0xFFFFFFFF00000000)).view(numpy.float64)
    erfc = numpy.exp(-z * z - 0.5625) * numpy.exp((z - magnitude) * (z + magnitude) + fraction) / magnitude
    return numpy.copysign(1.0 - erfc, x)


def _polynomial(x, coefficients):
    """``sum(c[i] * x**i)`` by Horner's rule, in the order s_erf.c evaluates it."""
    total = numpy.full_like(x, coefficients[-1])
    for coefficient in reversed(coefficients[:-1]):
        total *= x
        total += coefficient
    return total
