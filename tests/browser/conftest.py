"""Fixtures of the browser tests: the REAL stack (the session's redis-server, database 3; the
uvicorn API of ``tests/service/api_support``; a Celery worker of ``tests/workers``) and Debian's
chromium driven headless by Playwright for Python.

Without chromium (or Playwright) these tests skip with the reason, except when the ``CI``
environment variable is set: then they fail, so that CI never passes them silently
(``make browser`` installs chromium).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import httpx
import pytest

from infra.redis_server import RedisServer
from infra.settings import Settings
from tests import databases
from tests.service.api_support import ADMIN_KEY, ApiServer, server_env
from tests.workers.worker_support import start_worker, stop_worker

DB = databases.BROWSER
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
# The committed screenshots (docs/screenshots) are refreshed only when asked,
# REGCL_SCREENSHOT_DIR=docs/screenshots, so a test run leaves the work tree clean.
SCRATCH_SCREENSHOTS = Path(tempfile.gettempdir()) / "regcl-screenshots"


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the browser tests must run; `make browser` "
                    "installs Debian's chromium)")
    pytest.skip(reason)


def chromium_path() -> str:
    """Debian's chromium (``REGCL_TEST_CHROMIUM`` overrides the lookup)."""
    explicit = os.environ.get("REGCL_TEST_CHROMIUM")
    if explicit:
        if not os.path.isfile(explicit):
            unavailable(f"REGCL_TEST_CHROMIUM={explicit} does not exist")
        return explicit
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    unavailable("chromium is not installed (apt-get install chromium, or `make browser`)")
    raise AssertionError("unreachable")


@dataclass
class Stack:
    """The API and a worker sharing one Redis database and one data directory."""

    api: ApiServer
    worker: Popen[bytes]
    worker_log: Path

    @property
    def url(self) -> str:
        return self.api.url

    def client(self, key: str | None = ADMIN_KEY) -> httpx.Client:
        return self.api.client(key)

    def logs(self) -> str:
        worker = "\n".join(self.worker_log.read_text(errors="replace").splitlines()[-40:])
        return f"API log:\n{self.api.log_tail(40)}\nworker log:\n{worker}"


@pytest.fixture(scope="session")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    chromium_path()  # skip (or fail on CI) before starting anything
    redis_url = databases.emptied(redis_server, DB)
    data_dir = tmp_path_factory.mktemp("browser")
    api = ApiServer(server_env(redis_url, data_dir), data_dir / "api.log")
    settings = Settings(redis_url=redis_url, data_dir=data_dir, model="tiny")
    worker_log = data_dir / "worker.log"
    started: dict[str, Popen[bytes]] = {}
    failed: list[BaseException] = []

    def run_worker() -> None:  # starts while the API loads its model
        try:
            started["worker"] = start_worker(settings, worker_log,
                                             f"browser-{os.getpid()}@localhost")
        except BaseException as exc:  # re-raised below
            failed.append(exc)

    thread = threading.Thread(target=run_worker)
    thread.start()
    try:
        api.start()
    finally:
        thread.join()
    if failed:
        api.stop()
        raise failed[0]
    try:
        yield Stack(api, started["worker"], worker_log)
    finally:
        stop_worker(started["worker"])
        api.stop()


@pytest.fixture(scope="session")
def browser(stack: Stack, chromium: object) -> object:
    """The session's chromium (tests/conftest.py), once the stack is up."""
    return chromium


@pytest.fixture
def page(browser, stack: Stack) -> Iterator[object]:
    """A fresh context (empty sessionStorage) and page; the test fails on any script error,
    and on any request that leaves the API's origin (no assets from elsewhere)."""
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    foreign: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error"
            and "Failed to load resource" not in msg.text else None)

    def check_origin(request) -> None:
        if not request.url.startswith((stack.url, "blob:", "data:")):
            foreign.append(request.url)

    page.on("request", check_origin)
    page.set_default_timeout(60_000)
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"script errors on the page: {errors}\n{stack.logs()}"
    assert not foreign, f"the page fetched from elsewhere: {foreign}"


def screenshot(page, name: str, selector: str | None = None) -> Path:
    """Save a viewport screenshot (or of the element ``selector`` picks) as <name>.png under
    ``REGCL_SCREENSHOT_DIR`` (``docs/screenshots`` refreshes the committed ones), by default
    under a scratch folder in the system's temp dir."""
    folder = Path(os.environ.get("REGCL_SCREENSHOT_DIR") or SCRATCH_SCREENSHOTS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    target = page.locator(selector) if selector else page
    target.screenshot(path=str(path))
    return path
