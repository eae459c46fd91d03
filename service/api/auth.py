"""Auth before the body: :class:`AdminAuthMiddleware` (pure ASGI) answers 401 / 403 for every
route that needs a key, before anything reads the request's body.

FastAPI reads (and spools to disk) a request's body before it runs the route's dependencies,
so this middleware finds, from the app's route table, every route that depends on
:func:`service.api.deps.require_admin` (or on :func:`service.api.deps.require_segment_access`, when
segmentation needs a key) and checks the key the same way the dependency does; the dependency
stays as the second check (and documents the route's security in OpenAPI).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from fastapi.dependencies.models import Dependant
from starlette.datastructures import Headers
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from infra.settings import Settings
from service.api.deps import (
    check_admin,
    check_segment_access,
    require_admin,
    require_segment_access,
)
from service.api.problems import problem_response, service_error_kind
from service.api.routes import api_routes, route_path
from service.engine.errors import ServiceError

__all__ = ["AdminAuthMiddleware", "guarded_routes", "key_check", "key_from_headers"]


def key_from_headers(headers: Headers) -> str | None:
    """The key a request presents, read as :func:`presented_key` reads it (Bearer first, then
    X-API-Key, then the password of basic auth)."""
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


def key_check(dependant: Dependant) -> Check | None:
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


def guarded_routes(app: Any) -> list[tuple[re.Pattern[str], frozenset[str], Check]]:
    """(path pattern, methods, key check) of each route of ``app`` that depends on
    :func:`require_admin` or :func:`require_segment_access`."""
    routes = []
    for path, route in api_routes(app):
        check = key_check(route.dependant)
        if check is not None:
            routes.append((compile_path(path)[0], frozenset(route.methods or ()), check))
    return routes


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
        path, method = route_path(scope), scope["method"]
        for pattern, methods, check in self._routes:
            if method in methods and pattern.match(path):
                return check
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        check = self._check_of(scope) if scope["type"] == "http" else None
        if check is not None:
            try:
                check(self.settings, key_from_headers(Headers(scope=scope)))
            except ServiceError as exc:
                response = problem_response(None, service_error_kind(type(exc)), str(exc),
                                            headers={**exc.headers, "Connection": "close"},
                                            instance=scope.get("path", ""))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
