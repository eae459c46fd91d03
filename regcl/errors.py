"""Typed errors of the regcl library.

Every error subclasses :class:`RegclError` *and* the closest built-in, so callers can catch
either (``except regcl.ConfigError`` or ``except ValueError``).
"""

from __future__ import annotations


class RegclError(Exception):
    """Base class of every error raised on purpose by regcl."""


class ConfigError(RegclError, ValueError):
    """A setting or argument is invalid (unknown model name, bad rank, bad merge parameter)."""


class CheckpointError(RegclError, ValueError):
    """A model checkpoint is missing, unreadable, or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint or adapter file that was asked for does not exist."""


class AdapterError(RegclError, ValueError):
    """A LoRA adapter is malformed: wrong targets or shapes, non-finite values, missing files."""


class StatsError(AdapterError):
    """Gram statistics are missing or do not match the adapter they belong to."""


class MergeError(RegclError, ValueError):
    """A merge cannot be done: mismatched layers, missing statistics, unknown method."""


class DataError(RegclError, ValueError):
    """A dataset is malformed: missing files, masks that do not match images, bad references."""


class CancelledError(RegclError):
    """Long work (training, merging) was stopped on request (cooperative cancellation)."""


class RoutingError(RegclError, ValueError):
    """A domain router cannot be built or used: statistics of the wrong size, an unknown
    domain, tokens that do not fit its feature dimension."""
