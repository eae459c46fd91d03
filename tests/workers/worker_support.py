"""Helpers of the worker tests: a REAL Celery worker subprocess (solo pool; no eager mode, no
fakes), synthetic datasets, and the clients the API uses. The fixtures are in ``conftest.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from celery import Celery
from PIL import Image

from cli.up import REPO_ROOT, settings_env, worker_command
from infra.datasets import DatasetRecord, DatasetRegistry
from infra.errors import NotFound
from infra.jobs import JobRecord, JobStore, wait_for
from infra.redis_server import RedisServer
from infra.registry import Registry
from infra.settings import Settings
from regcl.data.domains import domain_split
from tests import databases

WORKER_DB = databases.WORKERS
JOB_TIMEOUT_S = 900.0  # generous: the suite may share 2 cores with other work (SCHED_IDLE)
START_TIMEOUT_S = 300.0


def write_domain_dataset(root: Path, domain: str, count: int = 8) -> Path:
    """``count`` training samples of a synthetic domain as PNG folder pairs (256 px)."""
    images, masks = domain_split(domain, "train", count)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        pixels = images[i].permute(1, 2, 0).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "images" / f"{domain}_{i}.png")
        Image.fromarray(masks[i].numpy().astype(np.uint8) * 255).save(
            root / "masks" / f"{domain}_{i}.png")
    return root


@dataclass
class Cluster:
    """What a test needs to drive the worker: its settings and the clients the API uses."""

    settings: Settings
    celery: Celery
    client: redis.Redis
    jobs: JobStore
    registry: Registry
    datasets: DatasetRegistry
    process: subprocess.Popen[bytes]
    hostname: str
    log: Path
    tmp: Path

    def wait(self, job: JobRecord | str, timeout_s: float = JOB_TIMEOUT_S) -> JobRecord:
        """The job once finished (fails the test with the worker's log tail on a timeout)."""
        job_id = job if isinstance(job, str) else job.id
        try:
            return wait_for(self.jobs, job_id, timeout_s, poll_s=0.2)
        except TimeoutError:
            pytest.fail(f"job {job_id} did not finish; worker log:\n{self.log_tail()}")

    def wait_until(self, predicate: Callable[[], bool], what: str,
                   timeout_s: float = JOB_TIMEOUT_S) -> None:
        wait_until(predicate, what, self.process, self.log, timeout_s)

    def add_dataset(self, domain: str, name: str | None = None, count: int = 8
                    ) -> DatasetRecord:
        """Dataset ``name`` (default: the domain) of ``count`` synthetic samples, once."""
        name = name or domain
        try:
            return self.datasets.get_dataset(name)
        except NotFound:
            root = write_domain_dataset(self.tmp / "datasets" / name, domain, count)
            return self.datasets.add_dataset(name, root, {"domain": domain})

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def wait_until(predicate: Callable[[], bool], what: str, process: subprocess.Popen[bytes],
               log: Path, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Poll ``predicate``; fail the test (with the log's tail) on a timeout or if ``process``
    dies meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
            problem = "the worker died" if process.poll() is not None else "timed out"
            pytest.fail(f"{problem} while waiting for {what}; worker log:\n{tail}")
        time.sleep(0.1)


def start_worker(settings: Settings, log: Path, hostname: str,
                 extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A worker subprocess for ``settings``, consuming once this returns (it has logged
    ``<hostname> ready.``). It inherits this process's scheduling (run the suite under
    ``chrt --idle 0 nice -n 19``)."""
    env = {**os.environ, **settings_env(settings), "REGCL_TORCH_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT), **(extra_env or {})}
    command = worker_command(hostname=hostname, extra=["--without-gossip", "--without-mingle"])
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    marker = f"{hostname} ready."
    try:
        wait_until(lambda: marker in log.read_text(errors="replace"), "the worker to start",
                   process, log, START_TIMEOUT_S)
    except BaseException:
        stop_worker(process)
        raise
    return process


def stop_worker(process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> int:
    """Warm shutdown (SIGTERM), then kill; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def worker_settings(redis_server: RedisServer, data_dir: Path, db: int) -> Settings:
    return Settings(redis_url=databases.database_url(redis_server, db), data_dir=data_dir,
                    model="tiny")
