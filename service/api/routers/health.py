"""``/healthz`` (the process is up), ``/readyz`` (model loaded, Redis reachable, live served) and
``/metrics`` (Prometheus text)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from infra import keys
from service.api.metrics import CONTENT_TYPE_LATEST, Metrics
from service.api.runtime import Runtime
from service.api.schemas.health import HealthResponse, ReadinessResponse

router = APIRouter(tags=["health"])
logger = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 1.0


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """The process is up and answering."""
    return HealthResponse(status="ok")


async def _live_pointer(runtime: Runtime) -> tuple[bool, int | None]:
    """Whether Redis answers (within a second), and the live pointer if it does."""
    try:
        value = await asyncio.wait_for(runtime.aredis.get(keys.LIVE), REDIS_TIMEOUT_S)
    except Exception as exc:  # any failure means "not reachable now"
        logger.debug("readiness: Redis did not answer: %s", exc)
        return False, None
    return True, None if value is None else int(value)


@router.get("/readyz", response_model=ReadinessResponse,
            responses={503: {"model": ReadinessResponse, "description": "Not ready"}})
async def readyz(request: Request) -> Response:
    """200 when the model is loaded, Redis answers and the live version is served (or this
    process serves an earlier one while it swaps); 503 (same body) otherwise: a process that
    could not fetch the live version yet (the artifact store away) is not ready."""
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    redis_ok, live = (False, None) if runtime is None else await _live_pointer(runtime)
    pending = None if runtime is None or live is None else runtime.engine.adapters.live_pending
    ready = runtime is not None and redis_ok and pending is None
    body = ReadinessResponse(status="ready" if ready else "not-ready",
                             model_loaded=runtime is not None, redis=redis_ok,
                             live_version=live,
                             served_version=(runtime.engine.adapters.live_version
                                             if runtime else None))
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, response_model=None,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                             "description": "Prometheus text exposition."}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this process."""
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
