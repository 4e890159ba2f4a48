"""Errors a user can cause and fix, and the option checks that raise them.

Every message names the problem: which argument, array or file, what was
found and what was expected. The command line prints them as one line.
"""

import math


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


def check_int(value, what, minimum=1):
    """``value`` as an int of at least ``minimum`` (bools refused), or a ConfigError naming ``what``."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"
        raise ConfigError(f"{what} must be a {kind} integer, got {value!r}")
    return int(value)


def check_number(value, what, allow_zero=False):
    """``value`` as a finite float above 0 (or at least 0), or a ConfigError naming ``what``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (number >= 0.0 if allow_zero else number > 0.0) or not math.isfinite(number):
        raise ConfigError(f"{what} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return number
