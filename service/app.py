"""The HTTP API: ``create_app(settings)`` and the ``lifespan`` that loads the model.

Start it with ``python -m service.app`` (binds ``REGCL_API_HOST:REGCL_API_PORT``) or
``uvicorn --factory service.app:create_app``; either way settings come from the ``REGCL_*``
environment (:class:`infra.settings.Settings`). Run ONE worker process per model copy: the
model, its adapters and the embedding cache live in the process.

Startup (lifespan): build the SAM and the engine, connect to Redis, serve the version the
live pointer names (so a restarted process serves what was live), then follow the pointer:
each activation anywhere hot-swaps the adapter here with no failed request. Startup does not
need Redis: the process then serves the base model, ``/readyz`` says 503 and the live
follower catches up once Redis answers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from infra.settings import MIB, Settings, get_settings
from service.api.auth import AdminAuthMiddleware
from service.api.metrics import Metrics, MetricsMiddleware
from service.api.openapi import install_openapi
from service.api.problems import install_problem_handlers
from service.api.routers import (
    adapters,
    datasets,
    embeddings,
    health,
    images,
    jobs,
    labelstudio,
    models,
    routing,
    segment,
    versions,
)
from service.api.routers.ui import install_ui
from service.api.runtime import Runtime, build_runtime
from service.api.store_deadline import StoreDeadlineMiddleware
from service.api.uploads import BodyLimitMiddleware

__all__ = ["create_app", "lifespan", "main", "request_body_limit"]

logger = logging.getLogger("service.app")  # also when run as __main__

API_DESCRIPTION = """\
Segment Anything that keeps improving on new image domains: one LoRA adapter per domain,
merged into one live adapter by RegMean (RegCL), hot-swapped into the serving model.

Errors are RFC 7807 `application/problem+json` with a stable `type`
(`https://regcl.dev/problems/<code>`). Every segmentation names the adapter version that
produced it. Mutating endpoints need an admin key (`Authorization: Bearer <key>` or
`X-API-Key`).
"""


def request_body_limit(settings: Settings) -> int:
    """Largest request body: room for the largest upload as base64 (4/3) plus form and JSON
    overhead. Each decoded file is then held to ``max_upload_bytes`` by the routes."""
    return settings.max_upload_bytes * 4 // 3 + MIB


def _serve_live_version(runtime: Runtime) -> None:
    try:
        swap = runtime.live.sync()
    except Exception as exc:  # Redis down, or a version that does not load: serve what we can
        logger.warning("not serving the live version at startup (%s); serving %s and "
                       "following the live pointer", exc, runtime.engine.adapters.live_label)
        return
    if swap is not None:
        logger.info("startup: serving live version %d", swap.version)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model and connect (in a thread: it blocks), serve the live version, follow
    the live pointer; undo it all at shutdown."""
    settings: Settings = app.state.settings
    runtime = await run_in_threadpool(build_runtime, settings, app.state.metrics)
    try:
        await run_in_threadpool(_serve_live_version, runtime)
        runtime.live.start()
        runtime.router.start(runtime.live)  # its first sync runs on its listener thread
        app.state.runtime = runtime
        labelstudio.open_backend(app, runtime)
        logger.info("regcl API ready (model %s)", settings.model)
        yield
    finally:
        app.state.runtime = None
        await run_in_threadpool(labelstudio.close_backend, app)
        await run_in_threadpool(runtime.close)
        await runtime.aredis.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The regcl API for ``settings`` (default: from the environment). Nothing is loaded
    until the app starts (its lifespan)."""
    settings = settings if settings is not None else get_settings()
    metrics = Metrics()
    app = FastAPI(title="regcl", version="0.1.0", description=API_DESCRIPTION,
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    install_problem_handlers(app)
    app.add_middleware(StoreDeadlineMiddleware, seconds=settings.api_store_deadline_s)
    app.add_middleware(BodyLimitMiddleware, max_bytes=request_body_limit(settings))
    app.add_middleware(AdminAuthMiddleware, settings=settings)  # 401 before a body is read
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts 413s too
    for module in (health, images, embeddings, segment, routing, models, adapters, datasets,
                   jobs, versions, labelstudio):
        app.include_router(module.router)
    install_ui(app)  # the web page at / (service/static)
    install_openapi(app, settings)  # the document states what the server does
    return app


def main() -> None:
    """``python -m service.app``: serve on ``REGCL_API_HOST:REGCL_API_PORT``."""
    import uvicorn

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port,
                workers=1, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
