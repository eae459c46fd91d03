"""The web page at ``/``: segment by clicking, manage domains, jobs and versions.

Plain HTML, CSS and ES modules from ``service/static`` (no build step, nothing fetched from
elsewhere at run time: the page's Content-Security-Policy allows this origin only; it also
allows compiling WebAssembly, ``'wasm-unsafe-eval'``, for onnxruntime-web, which the page uses
from ``static/vendor/`` when ``make vendor`` has put it there). The page
talks to the public API like any client; the admin key it is given stays in the browser tab's
sessionStorage.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC_DIR", "UI_PREFIX", "install_ui", "router"]

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
UI_PREFIX = "/ui"
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; "
                           "connect-src 'self'; style-src 'self'; "
                           "script-src 'self' 'wasm-unsafe-eval'; "
                           "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=FileResponse)
def index() -> FileResponse:
    """The page (its scripts and styles are under ``/ui/``)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                 "Cache-Control": "no-cache"})


def install_ui(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files at ``/ui/``."""
    app.include_router(router)
    app.mount(UI_PREFIX, StaticFiles(directory=STATIC_DIR), name="ui")
