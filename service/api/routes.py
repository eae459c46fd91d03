"""The app's API routes as the router matches them: full paths (with included routers'
prefixes) and methods. The auth middleware finds the routes that need a key here, and a 405
answer lists every method its path allows."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from fastapi.routing import APIRoute
from starlette.routing import compile_path

__all__ = ["allowed_methods", "api_routes", "route_path"]


def api_routes(app: Any) -> Iterator[tuple[str, APIRoute]]:
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


def allowed_methods(app: Any, path: str) -> list[str]:
    """The methods of the resource at ``path`` (for ``Allow``), sorted: those of the API
    routes whose template matches it with the fewest parameters (``/v1/jobs/train`` is the
    train route's, not a job id's)."""
    matching: dict[int, set[str]] = {}
    for template, route in api_routes(app):
        if compile_path(template)[0].match(path):
            matching.setdefault(template.count("{"), set()).update(route.methods or ())
    return sorted(matching[min(matching)]) if matching else []


def route_path(scope: Mapping[str, Any]) -> str:
    """The path the router matches: without the ``root_path`` a proxy mounts the app under."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root + "/"):
        return path[len(root):]
    return path
