"""RFC 7807 problem details: every error the API returns, as ``application/problem+json``.

Each kind of error has a stable ``type`` URI, ``https://regcl.dev/problems/<code>``; clients
branch on it (never on ``detail``, which is for people). The engine's errors bring their own
``code`` (:mod:`service.errors`); the library's and the platform's errors are mapped by class
in :data:`KINDS`; the HTTP layer raises :class:`ProblemError` for what is its own (auth, size
limits, a backend that is not configured). Internal errors (5xx) never show their message: the
response says only what kind of failure it was, the log has the traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from infra import errors as infra_errors
from regcl import errors as regcl_errors
from regcl.data.brush_rle import BrushRleError
from service import errors as service_errors
from service.labelstudio import errors as ls_errors
from service.routes import allowed_methods, route_path

__all__ = [
    "KINDS",
    "PROBLEM_BASE",
    "PROBLEM_MEDIA_TYPE",
    "Problem",
    "ProblemError",
    "ProblemKind",
    "install_problem_handlers",
    "kind_of",
    "problem_response",
    "problem_responses",
]

logger = logging.getLogger(__name__)

PROBLEM_BASE = "https://regcl.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


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


def _kind(code: str, status: int, title: str, expose: bool = True) -> ProblemKind:
    return ProblemKind(code, status, title, expose)


def _service(cls: type[service_errors.ServiceError] | type[service_errors.AdapterRejectedError],
             status: int, title: str) -> ProblemKind:
    return _kind(cls.code, status, title)


INTERNAL = _kind("internal-error", 500, "Internal server error", expose=False)
BACKEND_UNAVAILABLE = _kind("backend-unavailable", 503, "A backend service is unavailable",
                            expose=False)
VALIDATION = _kind("validation-error", 422, "The request does not match its schema")
BASE_MODEL_MISMATCH = _kind("base-model-mismatch", 422, "Adapter made for another base model")

KINDS: dict[type[BaseException], ProblemKind] = {
    # engine (service.errors): each class's own code
    service_errors.ImageNotFoundError: _service(service_errors.ImageNotFoundError, 404,
                                                "Image not found"),
    service_errors.UnknownAdapterError: _service(service_errors.UnknownAdapterError, 404,
                                                 "Unknown adapter"),
    service_errors.NotFoundError: _service(service_errors.NotFoundError, 404, "Not found"),
    service_errors.InvalidAdapterNameError: _service(service_errors.InvalidAdapterNameError, 422,
                                                     "Invalid adapter name"),
    service_errors.InvalidImageError: _service(service_errors.InvalidImageError, 422,
                                               "Invalid image"),
    service_errors.EmptyPromptError: _service(service_errors.EmptyPromptError, 422,
                                              "Empty prompt"),
    service_errors.PromptShapeError: _service(service_errors.PromptShapeError, 422,
                                              "Malformed prompt"),
    service_errors.NonFiniteValueError: _service(service_errors.NonFiniteValueError, 422,
                                                 "Non-finite value in prompt"),
    service_errors.ValueOutOfRangeError: _service(service_errors.ValueOutOfRangeError, 422,
                                                  "Prompt value out of range"),
    service_errors.OutOfBoundsError: _service(service_errors.OutOfBoundsError, 422,
                                              "Prompt outside the image"),
    service_errors.InvalidLabelError: _service(service_errors.InvalidLabelError, 422,
                                               "Invalid point label"),
    service_errors.InvalidBoxError: _service(service_errors.InvalidBoxError, 422, "Invalid box"),
    service_errors.TooManyPointsError: _service(service_errors.TooManyPointsError, 422,
                                                "Too many points"),
    service_errors.PromptError: _service(service_errors.PromptError, 422, "Invalid prompt"),
    service_errors.AdapterRejectedError: _service(service_errors.AdapterRejectedError, 422,
                                                  "Adapter rejected"),
    service_errors.ServiceError: _service(service_errors.ServiceError, 400, "Bad request"),
    # library (regcl.errors)
    regcl_errors.StatsError: _kind("invalid-stats", 422, "Invalid adapter statistics"),
    regcl_errors.AdapterError: _kind("invalid-adapter", 422, "Invalid adapter"),
    regcl_errors.DataError: _kind("invalid-data", 422, "Invalid data"),
    regcl_errors.MergeError: _kind("merge-error", 422, "Merge not possible"),
    regcl_errors.CancelledError: _kind("cancelled", 409, "Cancelled"),
    regcl_errors.CheckpointError: _kind("checkpoint-error", 500, "Model checkpoint error",
                                        expose=False),
    # platform (infra.errors)
    infra_errors.NotFound: _kind("not-found", 404, "Not found"),
    infra_errors.LockTimeout: _kind("lock-timeout", 409, "Resource busy"),
    infra_errors.InvalidTransition: _kind("invalid-transition", 409, "Invalid state change"),
    infra_errors.Conflict: _kind("conflict", 409, "Conflict"),
    infra_errors.InvalidName: _kind("invalid-name", 422, "Invalid name"),
    infra_errors.BaseModelMismatch: BASE_MODEL_MISMATCH,
    infra_errors.CorruptArtifact: _kind("corrupt-artifact", 500, "Stored artifact is corrupt",
                                        expose=False),
    infra_errors.RedisServerError: BACKEND_UNAVAILABLE,
    regcl_errors.ConfigError: _kind("invalid-argument", 422, "Invalid argument"),
    regcl_errors.RegclError: INTERNAL,
    # Redis unreachable: the request may succeed later
    redis.exceptions.ConnectionError: BACKEND_UNAVAILABLE,
    redis.exceptions.TimeoutError: BACKEND_UNAVAILABLE,
    redis.exceptions.BusyLoadingError: BACKEND_UNAVAILABLE,
}

# The Label Studio backend's (service.labelstudio.errors), and its brush masks
KINDS.update({cls: _kind(cls.code, status, title)
              for cls, (status, title) in ls_errors.KINDS.items()})
KINDS[BrushRleError] = _kind("invalid-brush-rle", 422, "Invalid brush RLE")

# Raised by the HTTP layer itself (ProblemError codes) or by Starlette (HTTPException status).
HTTP_KINDS: dict[str, ProblemKind] = {k.code: k for k in (
    _kind("bad-request", 400, "Bad request"),
    _kind("unauthorized", 401, "Missing or wrong API key"),
    _kind("mutations-disabled", 403, "Mutations are disabled (no admin key configured)"),
    _kind("not-found", 404, "Not found"),
    _kind("method-not-allowed", 405, "Method not allowed"),
    _kind("payload-too-large", 413, "Payload too large"),
    _kind("unsupported-media-type", 415, "Unsupported media type"),
    _kind("invalid-base64", 422, "Invalid base64 data"),
    _kind("unsafe-file", 422, "Unsafe file refused"),
    _kind("invalid-archive", 422, "Invalid archive"),
    _kind("reserved-name", 422, "Reserved name"),
    _kind("missing-stats", 409, "Adapter has no statistics"),
    _kind("jobs-unavailable", 503, "Job submission is not available"),
    VALIDATION, INTERNAL, BACKEND_UNAVAILABLE, BASE_MODEL_MISMATCH,
)}
_STATUS_CODES = {400: "bad-request", 401: "unauthorized", 404: "not-found",
                 405: "method-not-allowed", 413: "payload-too-large",
                 415: "unsupported-media-type", 422: "validation-error"}


def _register_broker_errors() -> None:
    """A job the broker would not take (kombu's errors, or workers.submit's EnqueueError)
    means the same as Redis being down."""
    try:
        from kombu.exceptions import OperationalError
    except ImportError:  # pragma: no cover - kombu ships with celery
        return
    KINDS[OperationalError] = BACKEND_UNAVAILABLE
    try:
        from workers.submit import EnqueueError
    except ImportError:  # a deployment without the workers package
        return
    KINDS[EnqueueError] = BACKEND_UNAVAILABLE


_register_broker_errors()


class ProblemError(Exception):
    """An error of the HTTP layer, answered as the problem of kind ``code`` (a key of
    :data:`HTTP_KINDS`) with ``detail`` and optional extension members and headers."""

    def __init__(self, code: str, detail: str | None = None, *,
                 headers: dict[str, str] | None = None, **extensions: Any) -> None:
        super().__init__(detail or code)
        self.kind = HTTP_KINDS[code]
        self.detail = detail
        self.headers = headers or {}
        self.extensions = extensions


def kind_of(exc: BaseException) -> ProblemKind:
    """The problem kind of an exception: the first class of its MRO found in :data:`KINDS`."""
    if isinstance(exc, ProblemError):
        return exc.kind
    for cls in type(exc).__mro__:
        kind = KINDS.get(cls)
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


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json answers for ``statuses``."""
    return {status: {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}},
                     "description": "Problem details (RFC 7807)"} for status in statuses}


async def _typed_error(request: Request, exc: Exception) -> JSONResponse:
    kind = kind_of(exc)
    headers: dict[str, str] = {}
    extensions: dict[str, Any] = {}
    if isinstance(exc, ProblemError):
        detail, headers, extensions = exc.detail, exc.headers, exc.extensions
    elif kind.expose:
        detail = str(exc)
    else:
        detail = None
    if kind.status >= 500:
        logger.error("%s %s failed (%s)", request.method, request.url.path, kind.code,
                     exc_info=exc)
        if kind is BACKEND_UNAVAILABLE:
            headers = {**headers, "Retry-After": "5"}
    return problem_response(request, kind, detail, headers=headers or None, **extensions)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code)
    kind = HTTP_KINDS[code] if code else ProblemKind(f"http-{exc.status_code}", exc.status_code,
                                                     "HTTP error")
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


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    kind = kind_of(exc)
    if kind is INTERNAL or kind.status >= 500:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return problem_response(request, kind, None)
    return await _typed_error(request, exc)


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as problem+json."""
    app.add_exception_handler(ProblemError, _typed_error)
    for cls in KINDS:
        if issubclass(cls, Exception):
            app.add_exception_handler(cls, _typed_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
