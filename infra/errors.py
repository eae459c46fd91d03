"""Typed errors of the shared platform (settings, Redis, artifacts, jobs, registry).

Like :mod:`regcl.errors`, each error subclasses :class:`~regcl.errors.RegclError` *and* the closest
built-in, so callers catch either. The service maps them to RFC 7807 problems:
``NotFound`` → 404, ``Conflict`` (and its subclasses) → 409, ``InvalidName`` → 422/400,
``BaseModelMismatch`` → 422 ``base-model-mismatch``,
``LockTimeout`` → 409/503, ``InsufficientStorage`` → 507 ``insufficient-storage``,
``StoreUnavailable`` → 503 ``store-unavailable`` (with ``Retry-After``),
``RedisServerError`` → startup failure.

The names say the outcome (``NotFound``, ``Conflict``) rather than ending in ``Error`` because
they are the platform's contract with the service and workers, mirroring HTTP's vocabulary.
"""

from __future__ import annotations

import errno

from regcl.errors import AdapterError, ConfigError, RegclError

__all__ = [
    "BaseModelMismatch",
    "ConfigError",
    "Conflict",
    "CorruptArtifact",
    "InsufficientStorage",
    "InvalidName",
    "InvalidTransition",
    "LockTimeout",
    "NotFound",
    "RedisServerError",
    "StoreUnavailable",
    "is_out_of_space",
]


class NotFound(RegclError, KeyError):  # noqa: N818
    """A job, adapter, version or artifact that was asked for does not exist."""

    def __str__(self) -> str:
        # KeyError's str() quotes its argument; keep the message readable in logs and problems.
        return str(self.args[0]) if self.args else ""


class Conflict(RegclError, RuntimeError):  # noqa: N818
    """The request clashes with current state: the name is taken, the job already finished."""


class InvalidTransition(Conflict):
    """A job state change that the lifecycle forbids (e.g. succeeded → running)."""


class LockTimeout(Conflict, TimeoutError):  # noqa: N818
    """A distributed lock (the merge lock) could not be acquired in time."""


class InvalidName(RegclError, ValueError):  # noqa: N818
    """An artifact key, adapter name or job kind breaks the naming rules."""


class BaseModelMismatch(AdapterError):  # noqa: N818
    """An adapter or version was made on another base model than the deployment's."""


class RedisServerError(RegclError, RuntimeError):
    """The embedded redis-server could not be found, started or stopped."""


class CorruptArtifact(RegclError, ValueError):  # noqa: N818
    """An artifact's files do not match the digests recorded when it was stored."""


class InsufficientStorage(RegclError, OSError):  # noqa: N818
    """The data directory (or the artifact store) has no room left for a write; nothing
    half-written was kept. Raised from the ``OSError`` (``ENOSPC``, ``EDQUOT``) it replaces."""


class StoreUnavailable(RegclError, ConnectionError):  # noqa: N818
    """The artifact store (S3, MinIO, ...) could not be reached or did not answer in time.
    Nothing was committed at the key the operation named; the same call may succeed later."""


def is_out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused for want of space (``ENOSPC``) or quota
    (``EDQUOT``)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
