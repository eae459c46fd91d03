"""Worker and ``regcl up`` lifecycles with real processes: a job interrupted by a worker's
shutdown goes back to the queue; ``run_up`` starts Redis + worker + API, stops them cleanly,
and stops everything when one of them dies."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cli.up import REPO_ROOT
from infra.artifacts import ArtifactStore
from infra.datasets import DatasetRegistry
from infra.jobs import JobState, JobStore, wait_for
from infra.redis_client import connect
from infra.redis_server import RedisServer
from infra.settings import Settings
from tests import databases
from tests.conftest import free_tcp_port
from tests.workers.worker_support import (
    JOB_TIMEOUT_S,
    START_TIMEOUT_S,
    start_worker,
    stop_worker,
    wait_until,
    worker_settings,
    write_domain_dataset,
)
from workers.celery_app import make_celery
from workers.submit import cancel_job, submit_train

LONG = {"epochs": 500, "rank": 4, "batch_size": 4}


def test_a_job_interrupted_by_a_worker_shutdown_is_requeued(redis_server: RedisServer,
                                                            tmp_path: Path) -> None:
    settings = worker_settings(redis_server, tmp_path / "data", db=databases.LIFECYCLE)
    databases.emptied(redis_server, databases.LIFECYCLE)
    client = connect(settings.redis_url)
    jobs = JobStore(client)
    DatasetRegistry(client, ArtifactStore(settings.artifact_url)).add_dataset(
        "polyp", write_domain_dataset(tmp_path / "polyp", "polyp"))
    app = make_celery(settings)
    log = tmp_path / "worker.log"
    first = start_worker(settings, log, "first@localhost")
    job = submit_train(app, jobs, dataset="polyp", domain="polyp", params=LONG)
    wait_until(lambda: jobs.get(job.id).detail.get("step", 0) >= 1, "training", first, log)

    assert stop_worker(first) == 0  # warm shutdown, without waiting for 500 epochs
    interrupted = jobs.get(job.id)
    assert interrupted.state is JobState.RUNNING and interrupted.attempts == 1
    assert interrupted.detail["phase"] == "requeued"

    second = start_worker(settings, log, "second@localhost")
    try:
        wait_until(lambda: jobs.get(job.id).attempts == 2, "the rerun", second, log)
        cancel_job(app, jobs, job.id)
        assert wait_for(jobs, job.id, JOB_TIMEOUT_S).state is JobState.CANCELLED
    finally:
        stop_worker(second)
        app.close()
        client.close()


class UpProcess:
    """``run_up`` in a subprocess (with a stand-in API), its output collected line by line."""

    def __init__(self, data_dir: Path, redis_port: int, api_port: int) -> None:
        self.data_dir = data_dir
        self.settings = Settings(data_dir=data_dir, redis_port=redis_port, api_port=api_port)
        env = {**os.environ, "REGCL_DATA_DIR": str(data_dir),
               "REGCL_REDIS_PORT": str(redis_port), "REGCL_API_PORT": str(api_port),
               "REGCL_TORCH_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
        env.pop("REGCL_REDIS_URL", None)
        code = ("import logging, sys; logging.basicConfig(level=logging.INFO); "
                "from infra.settings import Settings; from cli.up import run_up; "
                "sys.exit(run_up(Settings(), api_app='tests.workers.fake_api:create_app'))")
        # Its own session: like a terminal's foreground job, so a test can signal the group.
        self.process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout_s: float = START_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"no line matching {pattern!r}; output:\n{self.output[-6000:]}")

    def wait(self, timeout_s: float = 180.0) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"run_up did not stop; output:\n{self.output[-6000:]}")


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_run_up_starts_everything_and_stops_it_cleanly(tmp_path: Path) -> None:
    redis_port, api_port = free_tcp_port(), free_tcp_port()
    up = UpProcess(tmp_path / "data", redis_port, api_port)
    try:
        up.wait_for_line("regcl is up")
        assert httpx.get(f"http://127.0.0.1:{api_port}/health").json() == {"status": "ok"}
        client = connect(up.settings.redis_url)
        jobs = JobStore(client)
        app = make_celery(up.settings)
        job = submit_train(app, jobs, dataset="nowhere", domain="polyp")
        failed = wait_for(jobs, job.id, JOB_TIMEOUT_S)  # the worker took it from run_up's Redis
        assert (failed.state, failed.error.type) == (JobState.FAILED, "NotFound")
        app.close()
        client.close()
        assert any(line.startswith("worker| ") for line in up.lines)
        assert any(line.startswith("api   | ") for line in up.lines)
    finally:
        up.process.send_signal(signal.SIGTERM)
        code = up.wait()
    assert code == 0, up.output[-4000:]
    assert not _port_open(redis_port) and not _port_open(api_port)

    # Again on the same data: Redis kept the job; and a child that dies stops everything.
    again = UpProcess(tmp_path / "data", redis_port, api_port)
    try:
        again.wait_for_line("regcl is up")
        client = connect(again.settings.redis_url)
        assert JobStore(client).get(job.id).state is JobState.FAILED
        client.close()
        pid = int(again.wait_for_line(r"started worker \(pid (\d+)\)").group(1))
        os.kill(pid, signal.SIGKILL)
        assert again.wait() == 1
    finally:
        if again.process.poll() is None:
            again.process.kill()
    assert "worker exited unexpectedly" in again.output
    assert not _port_open(redis_port) and not _port_open(api_port)


def test_ctrl_c_in_a_terminal_stops_redis_last(tmp_path: Path) -> None:
    up = UpProcess(tmp_path / "data", free_tcp_port(), free_tcp_port())
    try:
        up.wait_for_line("regcl is up")
        os.killpg(up.process.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        assert up.wait() == 0
    finally:
        if up.process.poll() is None:
            up.process.kill()
    redis_log = (up.data_dir / "redis" / "redis.log").read_text()
    assert "Received SIGINT" not in redis_log, "Redis was stopped by the signal, not by run_up"
