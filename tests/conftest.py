"""Shared fixtures: small models and data that keep the suite to minutes on 2 CPU cores, a
REAL redis-server process for the tests that need Redis (no fakes), and the REAL HTTP API
server shared by the API tests of every directory.

Starting a server loads torch and the tiny SAM (seconds, more under a busy CPU), so one
server is shared by the whole session (:func:`api`); modules that must restart a server or
stop its Redis start their own with :func:`start_api`."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch

from infra.redis_client import connect
from infra.redis_server import RedisServer
from regcl.data import synthetic
from regcl.models.build import SAM_SPECS, build_sam_from_spec
from tests.s3_support import MotoS3
from tests.service.api_support import ApiServer, server_env


def pytest_configure(config):
    # One thread: the suite is many small ops, and with 2 cores a second torch thread spins
    # and slows them several-fold whenever anything else runs on the machine.
    torch.set_num_threads(1)


@pytest.fixture
def random_tiny():
    """A tiny SAM with seeded random weights (fast to build; nothing learnt)."""
    torch.manual_seed(0)
    return build_sam_from_spec(SAM_SPECS["tiny"])


@pytest.fixture(scope="session")
def source_batch():
    """8 held-out source scenes: images 8 x 3 x 256 x 256 in [0, 255], masks 8 x 256 x 256."""
    return synthetic.chunked(synthetic.source_scenes, 99, 0, 8, 256)


# -- Redis -------------------------------------------------------------------------------------


def free_tcp_port() -> int:
    """A TCP port that was free a moment ago (RedisServer refuses it if it has been taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1, for tests that run their own RedisServer."""
    return free_tcp_port()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session, persisting into a temporary directory.

    Database 0 belongs to ``redis_client`` (emptied before each test); the Celery worker of
    tests/workers uses database 1, so that flushing never removes the broker's queue bindings.
    """
    with RedisServer(tmp_path_factory.mktemp("redis"), free_tcp_port()) as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on the session server, with an empty database 0 for each test."""
    client = connect(redis_server.url)
    client.flushdb()
    yield client
    client.close()


# -- S3 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """One S3 endpoint (moto's server) for the session; this process reaches it through the
    ``AWS_*`` variables, set while the session lasts. Tests make their own buckets."""
    server = MotoS3(tmp_path_factory.mktemp("moto") / "moto.log").start()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.env().items():
            patch.setenv(name, value)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        try:
            yield server
        finally:
            server.stop()


# -- the HTTP API ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def start_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ApiServer]]:
    """``start_api(redis_url, **env)`` starts a server (stopped at the end of the session)."""
    servers: list[ApiServer] = []

    def start(redis_url: str, data_dir: Path | None = None, **overrides: str) -> ApiServer:
        data_dir = data_dir or tmp_path_factory.mktemp("api")
        server = ApiServer(server_env(redis_url, data_dir, **overrides),
                           data_dir / "server.log")
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def api(redis_server: RedisServer, start_api: Callable[..., ApiServer]) -> ApiServer:
    """The shared server (admin key ADMIN_KEY, uploads up to MAX_UPLOAD_BYTES). Tests that use
    it also take ``redis_client``, which empties its Redis database first."""
    return start_api(redis_server.url)


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    """Debian's chromium, launched once per session through Playwright's sync API (which
    allows one Playwright at a time in a thread: the browser tests and Label Studio's
    screenshot share this one). Skips without chromium or Playwright, fails when ``CI`` is
    set (see tests/browser/conftest.py)."""
    from tests.browser.conftest import CHROMIUM_ARGS, chromium_path, unavailable

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("Playwright for Python is not installed (pip install -e '.[dev]')")
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
