"""Typed errors with messages a user can act on. The CLI prints them as one line."""


class OptiQError(Exception):
    """Base class of every error OptiQ reports to users."""


class ModelLoadError(OptiQError):
    """A model directory is missing, incomplete, corrupt or of an unsupported type."""


class ConfigError(OptiQError):
    """An option, a config file or a combination of them is invalid."""


class DataError(OptiQError):
    """An input data file (calibration, training, evaluation) is unreadable or malformed."""


class MlxLmIncompatible(OptiQError):
    """The installed mlx-lm changed an internal that :mod:`optiq.core.mlx_lm_seam` patches or reads."""


class PatchConflict(OptiQError):
    """Two different OptiQ replacements were asked for the same mlx-lm attribute at once."""


class MemoryBudgetError(ConfigError):
    """The estimated peak memory of a run is over what is available (or ``--max-memory``)."""
