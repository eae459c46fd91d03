"""Helpers of the deployment tests: a stack of REAL processes laid out as on several hosts.

:class:`Deployment` owns one ``redis-server`` and starts Celery workers and HTTP API processes
on it, each with a data directory of its own (nothing on disk is shared unless the artifact
store is a local directory the caller chose). Everything is driven over HTTP with regcl's own
client (:class:`regcl.client.Client`), as a user drives it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cli.up import REPO_ROOT, settings_env, worker_command
from infra.artifacts import ArtifactStore
from infra.redis_server import RedisServer
from infra.settings import Settings
from regcl.client import Client, Job, JobFailedError, WaitTimeoutError
from tests.conftest import free_tcp_port
from tests.reliability.support import Worker, poll
from tests.service.api_support import ADMIN_KEY, ApiServer, server_env
from tests.workers.worker_support import JOB_TIMEOUT_S, START_TIMEOUT_S
from workers.celery_app import ALL_QUEUES


def say(message: str) -> None:
    """A figure for the reader of ``pytest -s``."""
    print(f"[deploy] {message}", flush=True)


class Deployment:
    """A redis-server, and API / worker processes each on its own data directory.

    ``settings``: fields of :class:`~infra.settings.Settings` every process gets (model,
    checkpoint, artifact_url, leases...); ``env``: more variables for every process (e.g.
    ``AWS_*``, thread counts).
    """

    def __init__(self, root: Path, env: dict[str, str] | None = None, **settings: Any) -> None:
        self.root = root
        self.env = dict(env or {})
        self.redis = RedisServer(root / "redis", free_tcp_port()).start()
        settings.setdefault("artifact_url", str(root / "artifacts"))
        self.settings = Settings(redis_url=self.redis.url, data_dir=root / "unused", **settings)
        self.store = ArtifactStore(self.settings.artifact_url)  # this process reads it too
        self.workers: list[Worker] = []
        self.apis: list[ApiServer] = []
        self.data_dirs: list[Path] = []

    def data_dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        self.data_dirs.append(path)
        return path

    def start_worker(self, name: str, queues: Sequence[str] = ALL_QUEUES, **env: str) -> Worker:
        """Worker ``<name>@localhost`` on ``queues``, consuming once this returns."""
        log = self.root / f"{name}.log"
        penv = {**os.environ, **settings_env(self.settings), "REGCL_TORCH_THREADS": "1",
                **self.env, "REGCL_DATA_DIR": str(self.data_dir(name)),
                "PYTHONPATH": str(REPO_ROOT), **env}
        command = worker_command(hostname=f"{name}@localhost", queues=queues,
                                 extra=["--without-gossip", "--without-mingle"])
        with open(log, "ab") as out:
            process = subprocess.Popen(command, env=penv, cwd=REPO_ROOT, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        worker = Worker(name, process, log)
        self.workers.append(worker)
        poll(lambda: f"{name}@localhost ready." in log.read_text(errors="replace")
             or process.poll() is not None, f"worker {name} to start", START_TIMEOUT_S, 0.2)
        assert process.poll() is None, log.read_text()[-3000:]
        return worker

    def start_api(self, **env: str) -> ApiServer:
        """An API process (``python -m service.app``) on a new data dir; up once it answers."""
        data_dir = self.data_dir(f"api-{len(self.apis)}")
        shared = {k: v for k, v in settings_env(self.settings).items()
                  if k in ("REGCL_ARTIFACT_URL", "REGCL_MODEL", "REGCL_CHECKPOINT")}
        server = ApiServer(server_env(self.redis.url, data_dir, **shared, **self.env, **env),
                           data_dir / "server.log")
        self.apis.append(server)
        return server.start()

    def logs(self) -> str:
        parts = [f"--- {w.name} ---\n{w.log.read_text(errors='replace')[-3000:]}"
                 for w in self.workers]
        parts += [f"--- api ---\n{a.log_tail(30)}" for a in self.apis]
        return "\n".join(parts)

    def close(self) -> None:
        for server in self.apis:
            server.stop()
        for worker in self.workers:
            worker.stop()
        self.redis.stop()


def client_of(server: ApiServer) -> Client:
    """regcl's HTTP client on ``server``, with the admin key."""
    return Client(server.url, ADMIN_KEY, timeout=600.0)


def wait_job(deployment: Deployment, client: Client, job: Job) -> Job:
    """The job once it succeeded (the test fails, with every process's log, otherwise)."""
    try:
        return client.wait(job, timeout=JOB_TIMEOUT_S, check=True, poll_s=0.2)
    except (JobFailedError, WaitTimeoutError) as exc:
        pytest.fail(f"{exc}\n{deployment.logs()}")


def wait_served(deployment: Deployment, client: Client, version: int,
                timeout_s: float = 300.0) -> None:
    """Until the API serves merged version ``version`` as live."""
    try:
        client.wait_served(version, timeout=timeout_s)
    except WaitTimeoutError as exc:
        pytest.fail(f"{exc}\n{deployment.logs()}")
