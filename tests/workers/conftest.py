"""Fixtures of the worker tests: one REAL Celery worker process for the session.

The worker runs on the session's redis-server, database 1 (``redis_client`` flushes database
0 before each test; flushing the broker's database would drop its queue bindings), with the
tiny model, one torch thread, and its own data directory. The tests talk to it exactly as the
API does: through :mod:`workers.submit` and the :class:`~infra.jobs.JobStore`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from infra.artifacts import ArtifactStore
from infra.datasets import DatasetRegistry
from infra.jobs import JobStore
from infra.redis_client import connect
from infra.redis_server import RedisServer
from infra.registry import Registry
from tests import databases
from tests.workers.worker_support import (
    WORKER_DB,
    Cluster,
    start_worker,
    stop_worker,
    worker_settings,
)
from workers.celery_app import make_celery


@pytest.fixture(scope="session")
def cluster(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Cluster]:
    """One worker for the session (database 1, its own data directory)."""
    tmp = tmp_path_factory.mktemp("cluster")
    settings = worker_settings(redis_server, tmp / "data", WORKER_DB)
    databases.emptied(redis_server, WORKER_DB)
    client = connect(settings.redis_url)
    store = ArtifactStore(settings.artifact_url)
    log = tmp / "worker.log"
    hostname = f"test-{os.getpid()}@localhost"
    process = start_worker(settings, log, hostname)
    app = make_celery(settings)
    try:
        yield Cluster(settings, app, client, JobStore(client), Registry(client, store),
                      DatasetRegistry(client, store), process, hostname, log, tmp)
    finally:
        code = stop_worker(process)
        app.close()
        client.close()
        assert code == 0, f"the worker exited with {code}:\n{log.read_text()[-4000:]}"
