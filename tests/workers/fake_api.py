"""A stand-in HTTP API for the ``run_up`` tests (``uvicorn tests.workers.fake_api:create_app
--factory``), so they do not depend on the real service's routes."""

from __future__ import annotations

from fastapi import FastAPI


def create_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
