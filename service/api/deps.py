"""Dependencies of the routes, as ``Annotated`` aliases (``def route(rt: RuntimeDep)``).

Auth: mutating endpoints take :data:`AdminKey`, segmentation takes :data:`SegmentAccess`. A key
comes as ``Authorization: Bearer <key>``, ``X-API-Key: <key>`` or as the password of HTTP basic
auth (any user name: what Label Studio's ML backend connection sends) and is compared with
``Settings.is_admin_key`` (constant time). Keys are never logged or echoed. With no admin key
configured every mutating endpoint answers 403 ``mutations-disabled``; a missing or wrong key
is 401 ``unauthorized``.

FastAPI reads (and spools to disk) a request's body before it runs the route's dependencies,
so :class:`service.api.auth.AdminAuthMiddleware` checks the key of every route that depends on
:func:`require_admin` (or on :func:`require_segment_access`, when segmentation needs a key)
*before* the body is read: an unauthenticated upload is refused without being received. The
dependencies stay as well (and document the routes' security in OpenAPI).

Every dependency here is ``async def``: none blocks, and FastAPI runs a plain ``def``
dependency in its thread pool, a hand-over to another thread and back for each one of every
request (a few of them per request were a tenth of a cached prompt's time in the profile).
"""

from __future__ import annotations

from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import Depends, HTTPException, Request
from fastapi.security import (
    APIKeyHeader,
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)

from infra.datasets import DatasetRegistry
from infra.jobs import JobStore
from infra.registry import Registry
from infra.settings import Settings
from service.api.errors import (
    JobsUnavailableError,
    MutationsDisabledError,
    ServiceStartingError,
    UnauthorizedError,
)
from service.api.runtime import Runtime
from service.engine.live_swap import LiveFollower
from service.engine.segmentation import SegmentationEngine

__all__ = [
    "AdminKey",
    "AsyncRedisDep",
    "CeleryDep",
    "DatasetsDep",
    "EngineDep",
    "JobStoreDep",
    "LiveDep",
    "RegistryDep",
    "RuntimeDep",
    "SegmentAccess",
    "SettingsDep",
    "celery_of",
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


async def get_runtime(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:  # only between process start and the end of the lifespan's startup
        raise ServiceStartingError("the service is starting")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


async def get_engine(runtime: RuntimeDep) -> SegmentationEngine:
    return runtime.engine


async def get_registry(runtime: RuntimeDep) -> Registry:
    return runtime.registry


async def get_job_store(runtime: RuntimeDep) -> JobStore:
    return runtime.jobs


async def get_datasets(runtime: RuntimeDep) -> DatasetRegistry:
    return runtime.datasets


async def get_async_redis(runtime: RuntimeDep) -> aioredis.Redis:
    return runtime.aredis


async def get_live(runtime: RuntimeDep) -> LiveFollower:
    return runtime.live


def celery_of(runtime: Runtime) -> Any:
    """The runtime's Celery app; JobsUnavailableError (503) in a deployment without one."""
    if runtime.celery is None:
        raise JobsUnavailableError("this deployment has no job queue (the workers "
                                   "package is not installed)")
    return runtime.celery


async def get_celery(runtime: RuntimeDep) -> Any:
    return celery_of(runtime)


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[SegmentationEngine, Depends(get_engine)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
JobStoreDep = Annotated[JobStore, Depends(get_job_store)]
DatasetsDep = Annotated[DatasetRegistry, Depends(get_datasets)]
CeleryDep = Annotated[Any, Depends(get_celery)]
AsyncRedisDep = Annotated[aioredis.Redis, Depends(get_async_redis)]
LiveDep = Annotated[LiveFollower, Depends(get_live)]


async def presented_key(
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


async def require_admin(settings: SettingsDep, key: PresentedKey) -> None:
    """Admit the request only with a valid admin key (401), if mutations are enabled (403)."""
    check_admin(settings, key)


def check_admin(settings: Settings, key: str | None) -> None:
    """MutationsDisabledError (403) / UnauthorizedError (401) unless ``key`` is an
    admin key of ``settings``."""
    if not settings.mutations_enabled:
        raise MutationsDisabledError("no admin key is configured "
                                     "(REGCL_ADMIN_KEYS), so this service accepts no changes")
    if not settings.is_admin_key(key):
        raise UnauthorizedError("a valid admin key is required (Authorization: "
                                "Bearer <key> or X-API-Key)", headers=_CHALLENGE)


async def require_segment_access(settings: SettingsDep, key: PresentedKey) -> None:
    """Segmentation is open unless ``segment_requires_key``; then it needs an admin key."""
    check_segment_access(settings, key)


def check_segment_access(settings: Settings, key: str | None) -> None:
    """UnauthorizedError (401) if segmentation needs a key and ``key`` is none."""
    if settings.segment_requires_key and not settings.is_admin_key(key):
        raise UnauthorizedError("this service requires a key for segmentation",
                                headers=_CHALLENGE)


AdminKey = Annotated[None, Depends(require_admin)]
SegmentAccess = Annotated[None, Depends(require_segment_access)]
