"""Fixtures of the HTTP API tests: the REAL server in a subprocess (see ``api_support``),
talking to the real redis-server of ``tests/conftest.py``; clients are httpx.

Starting a server loads torch and the tiny SAM (seconds, more under a busy CPU), so one
server is shared by the whole session (:func:`api`); modules that must restart a server or
stop its Redis start their own with :func:`start_api`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from infra.redis_server import RedisServer
from tests.service.api_support import ADMIN_KEY, ApiServer, server_env


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


@pytest.fixture
def anon(api: ApiServer, redis_client: redis.Redis) -> Iterator[httpx.Client]:
    """A client without a key on the shared server (its Redis database emptied first)."""
    with api.client() as client:
        yield client


@pytest.fixture
def admin(api: ApiServer, redis_client: redis.Redis) -> Iterator[httpx.Client]:
    """A client with the admin key on the shared server (its Redis database emptied first)."""
    with api.client(ADMIN_KEY) as client:
        yield client


