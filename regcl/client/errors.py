"""Errors of the HTTP client, mapped from the service's RFC 7807 problem+json answers.

Every answer that is not a success becomes an :class:`ApiError` of the class for its status
(:data:`STATUS_ERRORS`), carrying the problem's ``type`` (``https://regcl.dev/problems/<code>``;
:attr:`ApiError.code` is the ``<code>``), ``title``, ``detail`` and the whole body. Branch on
the class or on :attr:`ApiError.code`, never on ``detail`` (it is for people). Each class also
subclasses the closest built-in, as the library's errors do (``except LookupError`` catches a
404, ``except PermissionError`` a 401 or 403). :attr:`ApiError.retry_after` is the answer's
``Retry-After`` in seconds (the service sends it with every 503), None when absent.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from regcl.errors import RegclError

__all__ = [
    "STATUS_ERRORS",
    "ApiConnectionError",
    "ApiError",
    "AuthError",
    "ConflictError",
    "ForbiddenError",
    "InvalidRequestError",
    "JobFailedError",
    "JobTimeoutError",
    "NotFoundError",
    "PayloadTooLargeError",
    "ProtocolError",
    "ServiceUnavailableError",
    "UnauthorizedError",
    "WaitTimeoutError",
    "error_from_response",
]

PROBLEM_BASE = "https://regcl.dev/problems/"


class ApiError(RegclError):
    """The service answered with an error status (see the module doc)."""

    def __init__(self, status: int, type: str, title: str, detail: str | None = None,
                 body: dict[str, Any] | None = None, method: str = "", path: str = "",
                 retry_after: float | None = None) -> None:
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.body = body or {}
        self.method = method
        self.path = path
        self.retry_after = retry_after  # seconds to wait before trying again, if the answer said
        where = f"{method} {path} " if method else ""
        text = f"{where}answered {status} {title}"
        super().__init__(f"{text}: {detail} [{self.code}]" if detail else f"{text} [{self.code}]")

    @property
    def code(self) -> str:
        """The problem's code: the last segment of ``type`` (``not-found``, ``empty-prompt``)."""
        return self.type.removeprefix(PROBLEM_BASE).rsplit("/", 1)[-1]

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, for multiprocessing
        return (type(self), (self.status, self.type, self.title, self.detail, self.body,
                             self.method, self.path, self.retry_after))


class InvalidRequestError(ApiError, ValueError):
    """400 or 422: the request was refused as malformed or invalid (bad prompt, bad image,
    bad parameters, schema mismatch)."""


class AuthError(ApiError, PermissionError):
    """401 or 403."""


class UnauthorizedError(AuthError):
    """401 ``unauthorized``: a missing or wrong admin key."""


class ForbiddenError(AuthError):
    """403, e.g. ``mutations-disabled`` (the service has no admin key configured)."""


class NotFoundError(ApiError, LookupError):
    """404: the image, adapter, dataset, job or version does not exist (any more)."""


class ConflictError(ApiError):
    """409: the name is taken, the resource is busy, or the job has finished already."""


class PayloadTooLargeError(ApiError, ValueError):
    """413: the upload is larger than the service's ``max_upload_bytes``."""


class ServiceUnavailableError(ApiError):
    """503: a backend (Redis, the job queue) is unavailable, or the service is starting; the
    same request may succeed later."""


STATUS_ERRORS: dict[int, type[ApiError]] = {
    400: InvalidRequestError,
    401: UnauthorizedError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: InvalidRequestError,
    503: ServiceUnavailableError,
}


class ApiConnectionError(RegclError, ConnectionError):
    """The service could not be reached, or the connection broke before an answer."""


class ProtocolError(RegclError, ValueError):
    """An answer contradicts itself or the API (e.g. the version header and body disagree)."""


class WaitTimeoutError(RegclError, TimeoutError):
    """A wait (for readiness, a served version) ran out of time."""


class JobTimeoutError(WaitTimeoutError):
    """:meth:`~regcl.client.Client.wait` ran out of time; ``job`` is the last record seen."""

    def __init__(self, message: str, job: Any = None) -> None:
        super().__init__(message)
        self.job = job


class JobFailedError(RegclError):
    """A job waited for with ``check=True`` ended ``failed`` or ``cancelled``; ``job`` is its
    final record (``job.error`` says why)."""

    def __init__(self, message: str, job: Any = None) -> None:
        super().__init__(message)
        self.job = job


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` value in seconds from now (delay-seconds or an HTTP date, RFC 9110
    10.2.3); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - time.time(), 0.0)


def error_from_response(status: int, content: bytes, method: str = "", path: str = "",
                        reason: str = "", headers: Mapping[str, str] | None = None) -> ApiError:
    """The :class:`ApiError` for an error answer: its class by ``status`` (else
    :class:`ApiError`), its fields from the problem+json body (a body that is not one, such
    as a proxy's HTML page, gives type ``about:blank`` and the body's start as detail) and
    ``retry_after`` from the ``Retry-After`` header."""
    body: Any = None
    with contextlib.suppress(ValueError):
        body = json.loads(content) if content else None
    cls = STATUS_ERRORS.get(status, ApiError)
    retry = retry_after_seconds(next((v for k, v in (headers or {}).items()
                                      if k.lower() == "retry-after"), None))
    if isinstance(body, dict) and isinstance(body.get("type"), str):
        detail = body.get("detail")
        return cls(status, body["type"], str(body.get("title") or reason),
                   detail if isinstance(detail, str) else None, body, method, path, retry)
    text = content[:300].decode(errors="replace").strip() or None
    return cls(status, "about:blank", reason or f"HTTP {status}", text,
               body if isinstance(body, dict) else None, method, path, retry)
