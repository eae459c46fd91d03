"""Fixtures of the HTTP client's tests: the REAL platform the client talks to in use.

:func:`platform` is one Celery worker process and one API process (uvicorn) sharing database 3
of the session's redis-server and one artifact store, so jobs submitted through the client
really run; :func:`keyless_api` is an API with no admin key configured (every mutation 403).
Both are started through tests/conftest.py's session fixtures (``redis_server``,
``start_api``) and tests/workers' worker helpers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.redis_server import RedisServer
from infra.settings import Settings
from regcl.client import Client
from tests import databases
from tests.service.api_support import ADMIN_KEY, ApiServer
from tests.workers.worker_support import start_worker, stop_worker, worker_settings

PLATFORM_DB = databases.CLIENT
KEYLESS_DB = databases.CLIENT_KEYLESS


@dataclass(frozen=True)
class Platform:
    """An API and a worker on one Redis database and one artifact store."""

    api: ApiServer
    settings: Settings
    worker_log: Path

    def client(self, key: str | None = ADMIN_KEY, **kwargs) -> Client:
        return Client(self.api.url, key, **kwargs)

    def logs(self) -> str:
        worker = self.worker_log.read_text(errors="replace").splitlines()[-40:]
        return "--- worker ---\n" + "\n".join(worker) + "\n--- api ---\n" + self.api.log_tail()


@pytest.fixture(scope="session")
def platform(redis_server: RedisServer, start_api, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("client")
    databases.emptied(redis_server, PLATFORM_DB)
    settings = worker_settings(redis_server, tmp / "worker", PLATFORM_DB)
    log = tmp / "worker.log"
    worker = start_worker(settings, log, f"client-{os.getpid()}@localhost")
    try:
        api = start_api(settings.redis_url, tmp_path_factory.mktemp("client-api"),
                        REGCL_ARTIFACT_URL=settings.artifact_url)
        yield Platform(api, settings, log)
    finally:
        code = stop_worker(worker)
    assert code == 0, f"the worker exited with {code}:\n{log.read_text()[-4000:]}"


@pytest.fixture
def admin(platform: Platform) -> Iterator[Client]:
    with platform.client() as client:
        yield client


@pytest.fixture
def anon(platform: Platform) -> Iterator[Client]:
    with platform.client(None) as client:
        yield client


@pytest.fixture(scope="session")
def keyless_api(redis_server: RedisServer, start_api) -> ApiServer:
    return start_api(databases.emptied(redis_server, KEYLESS_DB), REGCL_ADMIN_KEYS="")
