"""RFC 7807 problem details: every error the API returns, as ``application/problem+json``.

Each kind of error has a stable ``type`` URI, ``https://regcl.dev/problems/<code>``; clients
branch on it (never on ``detail``, which is for people). The service's own errors
(:class:`service.engine.errors.ServiceError` and its subclasses in the engine, the Label
Studio backend and :mod:`service.api.errors`) state their code, status and title themselves;
the errors of the layers below, which know nothing of HTTP (the library, the platform, Redis,
the broker), are mapped in :data:`FOREIGN`, the one table. Internal errors (5xx) never show
their message: the response says only what kind of failure it was, the log has the traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from infra import errors as infra_errors
from regcl import errors as regcl_errors
from service.api.routes import allowed_methods, route_path
from service.engine.errors import ServiceError

__all__ = [
    "FOREIGN",
    "PROBLEM_BASE",
    "PROBLEM_MEDIA_TYPE",
    "Problem",
    "ProblemKind",
    "error_response",
    "install_problem_handlers",
    "kind_of",
    "problem_response",
    "problem_responses",
    "service_error_kinds",
]

logger = logging.getLogger(__name__)

PROBLEM_BASE = "https://regcl.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"
RETRY_AFTER_S = "5"


class Problem(BaseModel):
    """An RFC 7807 problem (the body of every error response)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None


@dataclass(frozen=True)
class ProblemKind:
    """One kind of error: its code (the last segment of ``type``), HTTP status and title.
    ``expose``: whether the exception's message may be shown as ``detail``."""

    code: str
    status: int
    title: str
    expose: bool = True

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.code


INTERNAL = ProblemKind("internal-error", 500, "Internal server error", expose=False)
BACKEND_UNAVAILABLE = ProblemKind("backend-unavailable", 503, "A backend service is unavailable",
                                  expose=False)
VALIDATION = ProblemKind("validation-error", 422, "The request does not match its schema")
INSUFFICIENT_STORAGE = ProblemKind("insufficient-storage", 507, "Insufficient storage")
STORE_UNAVAILABLE = ProblemKind("store-unavailable", 503, "The artifact store is unavailable",
                                expose=False)

FOREIGN: dict[type[BaseException], ProblemKind] = {
    # library (regcl.errors)
    regcl_errors.StatsError: ProblemKind("invalid-stats", 422, "Invalid adapter statistics"),
    regcl_errors.AdapterError: ProblemKind("invalid-adapter", 422, "Invalid adapter"),
    regcl_errors.DataError: ProblemKind("invalid-data", 422, "Invalid data"),
    regcl_errors.MergeError: ProblemKind("merge-error", 422, "Merge not possible"),
    regcl_errors.CancelledError: ProblemKind("cancelled", 409, "Cancelled"),
    regcl_errors.CheckpointError: ProblemKind("checkpoint-error", 500, "Model checkpoint error",
                                              expose=False),
    regcl_errors.ConfigError: ProblemKind("invalid-argument", 422, "Invalid argument"),
    regcl_errors.RegclError: INTERNAL,
    # platform (infra.errors)
    infra_errors.NotFound: ProblemKind("not-found", 404, "Not found"),
    infra_errors.LockTimeout: ProblemKind("lock-timeout", 409, "Resource busy"),
    infra_errors.InvalidTransition: ProblemKind("invalid-transition", 409,
                                                "Invalid state change"),
    infra_errors.Conflict: ProblemKind("conflict", 409, "Conflict"),
    infra_errors.InvalidName: ProblemKind("invalid-name", 422, "Invalid name"),
    infra_errors.BaseModelMismatch: ProblemKind("base-model-mismatch", 422,
                                                "Adapter made for another base model"),
    infra_errors.CorruptArtifact: ProblemKind("corrupt-artifact", 500,
                                              "Stored artifact is corrupt", expose=False),
    infra_errors.InsufficientStorage: INSUFFICIENT_STORAGE,
    infra_errors.StoreUnavailable: STORE_UNAVAILABLE,  # S3 / MinIO down or too slow
    infra_errors.RedisServerError: BACKEND_UNAVAILABLE,
    # Redis unreachable: the request may succeed later
    redis.exceptions.ConnectionError: BACKEND_UNAVAILABLE,
    redis.exceptions.TimeoutError: BACKEND_UNAVAILABLE,
    redis.exceptions.BusyLoadingError: BACKEND_UNAVAILABLE,
}
"""The problem of each error class of the layers below the service (the first class of an
exception's MRO found here decides)."""

# Framework answers (Starlette's HTTPException) by status.
_HTTP_STATUS: dict[int, ProblemKind] = {k.status: k for k in (
    ProblemKind("bad-request", 400, "Bad request"),
    ProblemKind("unauthorized", 401, "Missing or wrong API key"),
    ProblemKind("not-found", 404, "Not found"),
    ProblemKind("method-not-allowed", 405, "Method not allowed"),
    ProblemKind("payload-too-large", 413, "Payload too large"),
    ProblemKind("unsupported-media-type", 415, "Unsupported media type"),
    VALIDATION,
)}


def _register_broker_errors() -> None:
    """A job the broker would not take (kombu's errors, or workers.submit's EnqueueError)
    means the same as Redis being down."""
    try:
        from kombu.exceptions import OperationalError
    except ImportError:  # pragma: no cover - kombu ships with celery
        return
    FOREIGN[OperationalError] = BACKEND_UNAVAILABLE
    try:
        from workers.submit import EnqueueError
    except ImportError:  # a deployment without the workers package
        return
    FOREIGN[EnqueueError] = BACKEND_UNAVAILABLE


_register_broker_errors()


def service_error_kind(cls: type[ServiceError]) -> ProblemKind:
    """The problem a service error class states."""
    return ProblemKind(cls.code, cls.status, cls.title, cls.expose)


def service_error_kinds() -> dict[type[ServiceError], ProblemKind]:
    """Every service error class (imported so far) with its problem."""
    found: dict[type[ServiceError], ProblemKind] = {}
    pending: list[type[ServiceError]] = [ServiceError]
    while pending:
        cls = pending.pop()
        found[cls] = service_error_kind(cls)
        pending.extend(cls.__subclasses__())
    return found


def kind_of(exc: BaseException) -> ProblemKind:
    """The problem kind of an exception: its own if it is a service error, else that of the
    first class of its MRO found in :data:`FOREIGN`; a write refused for want of space that
    no layer named (an ``OSError`` ``ENOSPC``) is ``insufficient-storage`` too, without its
    message (it names server paths); otherwise an internal error."""
    if isinstance(exc, ServiceError):
        return service_error_kind(type(exc))
    if infra_errors.is_out_of_space(exc):
        return replace(INSUFFICIENT_STORAGE, expose=False)
    for cls in type(exc).__mro__:
        kind = FOREIGN.get(cls)
        if kind is not None:
            return kind
    return INTERNAL


def problem_response(request: Request | None, kind: ProblemKind, detail: str | None = None, *,
                     headers: dict[str, str] | None = None, **extensions: Any) -> JSONResponse:
    """A problem+json response of ``kind``."""
    body: dict[str, Any] = {"type": kind.type, "title": kind.title, "status": kind.status}
    if detail:
        body["detail"] = detail
    if request is not None:
        body["instance"] = request.url.path
    body.update(extensions)  # may set "instance" where there is no request object
    return JSONResponse(body, status_code=kind.status, headers=headers,
                        media_type=PROBLEM_MEDIA_TYPE)


def error_response(request: Request | None, exc: BaseException) -> JSONResponse:
    """The problem+json answer to ``exc`` (its message only where its kind exposes it; 5xx
    logged with the traceback; Retry-After on every 503: the request may succeed later)."""
    kind = kind_of(exc)
    headers = dict(getattr(exc, "headers", None) or {}) if isinstance(exc, ServiceError) else {}
    detail = (str(exc) or None) if kind.expose else None
    if kind.status >= 500:
        where = f"{request.method} {request.url.path}" if request is not None else "request"
        logger.error("%s failed (%s)", where, kind.code, exc_info=exc)
        if kind.status == 503:  # a backend away: the request may succeed later
            headers.setdefault("Retry-After", RETRY_AFTER_S)
    return problem_response(request, kind, detail, headers=headers or None)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json answers for ``statuses``."""
    return {status: {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}},
                     "description": "Problem details (RFC 7807)"} for status in statuses}


async def _typed_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request, exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = _HTTP_STATUS.get(exc.status_code) or ProblemKind(
        f"http-{exc.status_code}", exc.status_code, "HTTP error")
    detail = exc.detail if isinstance(exc.detail, str) else None
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:  # Starlette names one route's methods; the path may have more
        headers["Allow"] = ", ".join(allowed_methods(request.app, route_path(request.scope)))
    return problem_response(request, kind, detail, headers=headers or None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # loc / msg / type only: echoing ``input`` could return megabytes of base64 (or a secret).
    errors = [{"loc": [str(part) for part in error.get("loc", ())],
               "msg": str(error.get("msg", "")), "type": str(error.get("type", ""))}
              for error in exc.errors()]
    first = errors[0] if errors else None
    detail = f"{'.'.join(first['loc'])}: {first['msg']}" if first else None
    return problem_response(request, VALIDATION, detail, errors=errors)


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as problem+json."""
    app.add_exception_handler(ServiceError, _typed_error)
    for cls in FOREIGN:
        if issubclass(cls, Exception):
            app.add_exception_handler(cls, _typed_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _typed_error)
