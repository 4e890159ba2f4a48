"""Errors a user can cause and fix, and the option checks that raise them.

Every message names the problem: which argument, array or file, what was
found and what was expected. The command line prints them as one line.
"""

import argparse
import math
import numbers

import numpy

SPECIAL_FILE = "not a regular file (a device, pipe or socket)"  # what a path that exists may be instead


class NnaccelError(Exception):
    """Base class of the errors caused by user input (not by bugs)."""


class DeviceError(NnaccelError):
    """A device is unknown or unusable, or arrays from two devices were mixed."""


class ShapeError(NnaccelError, ValueError):
    """An array has the wrong shape, dtype or length for where it is used."""


class ConfigError(NnaccelError, ValueError):
    """An option has a nonsense value or names something that does not exist."""


class DataError(NnaccelError):
    """A data file is missing, truncated, corrupt or inconsistent."""


class CheckpointError(NnaccelError):
    """A checkpoint is missing, truncated, or belongs to another model."""


class OutputError(NnaccelError):
    """An output file cannot be written: its folder is missing or read-only, or the disk is full."""


def described(value):
    """A value as an error message shows it: ``None``, ``'cosine'``, ``the class StepLR``, ``a tuple of 1``,
    ``an array of shape (3, 4)``, ``a builtin_function_or_method``."""
    if isinstance(value, type):
        return f"the class {value.__name__} (call it to make one)"
    if value is None or isinstance(value, (str, int, float)):
        return repr(value)
    if hasattr(value, "shape"):
        return f"an array of shape {tuple(value.shape)}"
    kind = type(value).__name__
    return f"a {kind} of {len(value)}" if isinstance(value, (tuple, list)) else f"a {kind}"


def shown(value):
    """``value`` as a refusal shows it: its repr, with its type unless it is a number or None (``'0.1' (a str)``,
    ``True (a bool)``)."""
    if value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool)):
        return repr(value)
    return f"{value!r} (a {type(value).__name__})"


def _held(value):
    """A 0-d array (numpy.array(0.5), a CuPy reduction's result, a torch scalar tensor) as the Python value it
    holds, which the checks then take or refuse as they would that value; else ``value``."""
    return value.item() if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)) else value


def check_flag(value, what):
    """``value`` as a bool: True, False (NumPy's too, or a 0-d array of one) or the ints 1 and 0, else a
    ConfigError naming ``what`` (bool("False") is True: a string is refused)."""
    flag = _held(value)
    if isinstance(flag, bool) or (isinstance(flag, numbers.Integral) and flag in (0, 1)):
        return bool(flag)
    raise ConfigError(f"{what} must be True or False, got {shown(value)}")


def check_int(value, what, minimum=1):
    """``value`` as an int of at least ``minimum`` (bools refused), or a ConfigError naming ``what``."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"
        raise ConfigError(f"{what} must be a {kind} integer, got {shown(value)}")
    return int(value)


def check_saveable(value, kinds, what, names):
    """A ConfigError unless ``value``'s type is one of ``kinds``: one of one's own (a subclass trains) is refused
    by name, as a run resumed from a checkpoint, which rebuilds its ``what`` as one of ``names``, could not."""
    if type(value) not in kinds:
        raise ConfigError(f"a checkpoint holds the {what} {names}, not {type(value).__name__}: a run resumed "
                          f"from it could not rebuild that {what}")


def check_array(data, what):
    """A host data set (a list, nested lists) as a NumPy array, or a ShapeError naming ``what`` for one
    that is none (rows of different lengths, a scalar, None)."""
    try:
        array = numpy.asarray(data)
    except (TypeError, ValueError) as error:
        raise ShapeError(f"{what} is not an array of numbers: {error}") from None
    if array.ndim == 0:
        raise ShapeError(f"{what} must be an array with one entry per sample, got {data!r}")
    return array


def check_number(value, what, allow_zero=False):
    """``value`` as a finite float above 0 (or at least 0), or a ConfigError naming ``what``; a string or a
    bool, which float() takes, is refused."""
    try:
        held = _held(value)  # (numpy.array(True) too)
        number = math.nan if isinstance(held, (str, bytes, bool, numpy.bool_)) else float(held)
    except (TypeError, ValueError):
        number = math.nan
    if not (number >= 0.0 if allow_zero else number > 0.0) or not math.isfinite(number):
        raise ConfigError(f"{what} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {shown(value)}")
    return number


def _plain(number):
    """``1`` for 1.0, ``0.05`` for 0.05: a bound as a message writes it."""
    return int(number) if float(number).is_integer() and abs(number) < 2**53 else number


def describe_range(low=None, high=None, low_open=False, high_open=False, integer=False):
    """The valid range in words, as the error messages give it: ``a finite number >= 0 and < 1``,
    ``a positive number (finite, > 0)``, ``a positive integer up to 1437``. Integer bounds are inclusive."""
    if integer:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(low)
        if kind is None:
            return f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        return kind if high is None else f"{kind} up to {high}"
    if low == 0 and low_open and high is None:
        return "a positive number (finite, > 0)"
    bounds = [f"{'>' if low_open else '>='} {_plain(low)}"] if low is not None else []
    bounds += [f"{'<' if high_open else '<='} {_plain(high)}"] if high is not None else []
    return "a finite number " + " and ".join(bounds) if bounds else "a finite number"


def range_problem(value, low=None, high=None, low_open=False, high_open=False, integer=False):
    """None when ``value`` lies in the range (NaN and infinities never do), else what is wrong with it:
    ``must be a finite number >= 0 and < 1, got nan``."""
    if integer:
        fits = (not isinstance(value, bool) and hasattr(value, "__index__") and value >= low
                and (high is None or value <= high))
    else:
        held = _held(value)  # a 0-d array's number, as float() takes it
        real = isinstance(held, numbers.Real) and not isinstance(held, bool)  # not "0.5", not True
        try:
            number = float(held) if real else math.nan
        except OverflowError:  # an int beyond float's range
            number = math.inf
        fits = (math.isfinite(number) and (low is None or (number > low if low_open else number >= low))
                and (high is None or (number < high if high_open else number <= high)))
    return None if fits else f"must be {describe_range(low, high, low_open, high_open, integer)}, got {shown(value)}"


def check_range(value, what, low=None, high=None, low_open=False, high_open=False, integer=False):
    """``value`` (an int, or a float) when it lies in the range, else a ConfigError naming ``what`` and
    the range."""
    problem = range_problem(value, low, high, low_open, high_open, integer)
    if problem:
        raise ConfigError(f"{what} {problem}")
    return int(value) if integer else float(value)


def check_seed(value):
    """``value`` as a seed from 0 to 2**63 - 1, the range a checkpoint holds (a larger one, as NumPy's
    ``SeedSequence().entropy``, trained and saved a file that was refused on load), or a ConfigError."""
    return check_range(value, "seed", 0, 2**63 - 1, integer=True)


def number_option(low=None, high=None, low_open=False, high_open=False, integer=False):
    """An argparse ``type=``: the option's text as a number in the range, else an error argparse prints
    as ``argument --lr: must be a positive number (finite, > 0), got nan``."""
    words = describe_range(low, high, low_open, high_open, integer)

    def parse(text):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}") from None
        if range_problem(value, low, high, low_open, high_open, integer):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text}")
        return value

    return parse
