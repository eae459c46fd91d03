"""Dependencies of the routes, as ``Annotated`` aliases (``def route(rt: RuntimeDep)``).

Auth: mutating endpoints take :data:`AdminKey`, segmentation takes :data:`SegmentAccess`. A key
comes as ``Authorization: Bearer <key>``, ``X-API-Key: <key>`` or as the password of HTTP basic
auth (any user name: what Label Studio's ML backend connection sends) and is compared with
``Settings.is_admin_key`` (constant time). Keys are never logged or echoed. With no admin key
configured every mutating endpoint answers 403 ``mutations-disabled``; a missing or wrong key
is 401 ``unauthorized``.

FastAPI reads (and spools to disk) a request's body before it runs the route's dependencies,
so :class:`AdminAuthMiddleware` checks the key of every route that depends on
:func:`require_admin` (or on :func:`require_segment_access`, when segmentation needs a key)
*before* the body is read: an unauthenticated upload is refused without being received. The
dependencies stay as well (and document the routes' security in OpenAPI).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import (
    APIKeyHeader,
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)
from starlette.datastructures import Headers
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from infra.datasets import DatasetRegistry
from infra.jobs import JobStore
from infra.registry import Registry
from infra.settings import Settings
from service.engine import SegmentationEngine
from service.problems import ProblemError, problem_response
from service.runtime import Runtime

__all__ = [
    "AdminAuthMiddleware",
    "AdminKey",
    "CeleryDep",
    "DatasetsDep",
    "EngineDep",
    "JobStoreDep",
    "RegistryDep",
    "RuntimeDep",
    "SegmentAccess",
    "SettingsDep",
]

_bearer = HTTPBearer(auto_error=False, scheme_name="AdminKeyBearer",
                     description="An admin key as `Authorization: Bearer <key>`.")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="AdminKeyHeader",
                        description="An admin key as `X-API-Key: <key>`.")


class _BasicPassword(HTTPBasic):
    """HTTP basic auth carrying a key as its password; a malformed header is no key (the
    check then refuses it, or lets an open route through) rather than an error of its own."""

    async def __call__(self, request: Request) -> HTTPBasicCredentials | None:  # type: ignore[override]
        try:
            return await super().__call__(request)
        except HTTPException:
            return None


_basic = _BasicPassword(auto_error=False, scheme_name="AdminKeyBasic",
                        description="An admin key as the password of HTTP basic auth (any "
                        "user name), as Label Studio's ML backend connection sends it.")


def get_runtime(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:  # only between process start and the end of the lifespan's startup
        raise ProblemError("backend-unavailable", "the service is starting")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


def get_engine(runtime: RuntimeDep) -> SegmentationEngine:
    return runtime.engine


def get_registry(runtime: RuntimeDep) -> Registry:
    return runtime.registry


def get_job_store(runtime: RuntimeDep) -> JobStore:
    return runtime.jobs


def get_datasets(runtime: RuntimeDep) -> DatasetRegistry:
    return runtime.datasets


def get_celery(runtime: RuntimeDep) -> Any:
    if runtime.celery is None:
        raise ProblemError("jobs-unavailable", "this deployment has no job queue (the workers "
                           "package is not installed)")
    return runtime.celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[SegmentationEngine, Depends(get_engine)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
JobStoreDep = Annotated[JobStore, Depends(get_job_store)]
DatasetsDep = Annotated[DatasetRegistry, Depends(get_datasets)]
CeleryDep = Annotated[Any, Depends(get_celery)]


def presented_key(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
    basic: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
) -> str | None:
    """The key the client sent (Bearer first, then X-API-Key, then basic auth), or None."""
    if bearer is not None and bearer.credentials:
        return bearer.credentials
    if api_key:
        return api_key
    return basic.password if basic is not None and basic.password else None


PresentedKey = Annotated[str | None, Depends(presented_key)]
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="regcl"'}


def require_admin(settings: SettingsDep, key: PresentedKey) -> None:
    """Admit the request only with a valid admin key (401), if mutations are enabled (403)."""
    check_admin(settings, key)


def check_admin(settings: Settings, key: str | None) -> None:
    """ProblemError 403 ``mutations-disabled`` / 401 ``unauthorized`` unless ``key`` is an
    admin key of ``settings``."""
    if not settings.mutations_enabled:
        raise ProblemError("mutations-disabled", "no admin key is configured "
                           "(REGCL_ADMIN_KEYS), so this service accepts no changes")
    if not settings.is_admin_key(key):
        raise ProblemError("unauthorized", "a valid admin key is required (Authorization: "
                           "Bearer <key> or X-API-Key)", headers=_CHALLENGE)


def require_segment_access(settings: SettingsDep, key: PresentedKey) -> None:
    """Segmentation is open unless ``segment_requires_key``; then it needs an admin key."""
    check_segment_access(settings, key)


def check_segment_access(settings: Settings, key: str | None) -> None:
    """ProblemError 401 ``unauthorized`` if segmentation needs a key and ``key`` is none."""
    if settings.segment_requires_key and not settings.is_admin_key(key):
        raise ProblemError("unauthorized", "this service requires a key for segmentation",
                           headers=_CHALLENGE)


AdminKey = Annotated[None, Depends(require_admin)]
SegmentAccess = Annotated[None, Depends(require_segment_access)]


def key_from_headers(headers: Headers) -> str | None:
    """The key a request presents, read as :func:`presented_key` reads it (Bearer first)."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if headers.get("x-api-key"):
        return headers["x-api-key"]
    if scheme.lower() == "basic" and credentials.strip():
        try:
            decoded = base64.b64decode(credentials.strip()).decode("ascii")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


Check = Callable[[Settings, str | None], None]


def _gate(dependant: Dependant) -> Check | None:
    """The key check a route's dependencies imply: admin first, then segmentation access."""
    calls = set()
    stack = list(dependant.dependencies)
    while stack:
        dep = stack.pop()
        calls.add(dep.call)
        stack.extend(dep.dependencies)
    if require_admin in calls:
        return check_admin
    if require_segment_access in calls:
        return check_segment_access
    return None


def _api_routes(app: Any) -> Iterator[tuple[str, APIRoute]]:
    """Every API route of ``app`` with its full path (newer FastAPI keeps included routers
    nested and lists them through ``iter_route_contexts``; older ones flatten them)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - FastAPI before nested routers
        for route in app.routes:
            if isinstance(route, APIRoute):
                yield route.path, route
        return
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIRoute):
            yield context.path or route.path, route


def guarded_routes(app: Any) -> list[tuple[re.Pattern[str], frozenset[str], Check]]:
    """(path pattern, methods, key check) of each route of ``app`` that depends on
    :func:`require_admin` or :func:`require_segment_access`."""
    routes = []
    for path, route in _api_routes(app):
        check = _gate(route.dependant)
        if check is not None:
            routes.append((compile_path(path)[0], frozenset(route.methods or ()), check))
    return routes


def _route_path(scope: Scope) -> str:
    """The path the router matches: without the ``root_path`` a proxy mounts the app under."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root + "/"):
        return path[len(root):]
    return path


class AdminAuthMiddleware:
    """Refuse requests to routes that need a key (those depending on :func:`require_admin`,
    and on :func:`require_segment_access` when segmentation needs a key) without a valid one
    before anything reads their body: 401 / 403 problem+json, connection closed."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._routes: list[tuple[re.Pattern[str], frozenset[str], Check]] | None = None

    def _check_of(self, scope: Scope) -> Check | None:
        if self._routes is None:  # the route table is complete once requests arrive
            self._routes = guarded_routes(scope["app"])
        path, method = _route_path(scope), scope["method"]
        for pattern, methods, check in self._routes:
            if method in methods and pattern.match(path):
                return check
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        check = self._check_of(scope) if scope["type"] == "http" else None
        if check is not None:
            try:
                check(self.settings, key_from_headers(Headers(scope=scope)))
            except ProblemError as exc:
                response = problem_response(None, exc.kind, exc.detail,
                                            headers={**exc.headers, "Connection": "close"},
                                            instance=scope.get("path", ""))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
