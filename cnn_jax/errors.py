"""User-facing error types.

Every error a user can cause (a bad argument, config value, dataset name or file) is raised as a
`CnnJaxError`. The command line prints its message and exits with status 2, without a traceback.
Subclasses also derive from `ValueError` where Python convention expects one.
"""


class CnnJaxError(Exception):
    """Base class for errors caused by user input; the message says what to change."""


class ConfigError(CnnJaxError, ValueError):
    """An invalid configuration key or value."""


class ShapeError(CnnJaxError, ValueError):
    """An invalid argument or array shape passed to an op, layer or model."""


class DataError(CnnJaxError, ValueError):
    """An unknown dataset, an unprepared dataset, or an unreadable data file."""


class CheckpointError(CnnJaxError):
    """A missing, damaged or incompatible checkpoint."""
