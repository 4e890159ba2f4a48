"""Errors a user can cause and fix; the command line prints them as one line.

Every message names the problem: which argument, array or file, what was
found and what was expected.
"""


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
