"""Helpers of the reliability tests: a private stack of REAL processes that a test may break.

:class:`Rig` owns one ``redis-server`` (its own data directory and port, with the persistence
``infra.redis_server`` configures), any number of Celery worker processes and HTTP API
processes on it, and the clients the API uses. Leases and reaper rounds are short (seconds) so
that a worker's death is noticed quickly; the broker's own visibility timeout stays long, so a
killed job comes back only through the reaper. :class:`LoadClients` is N threads segmenting
through the API (each with the library's :class:`regcl.client.Client`) while a test does
something to the stack.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
import redis

from cli.up import REPO_ROOT, settings_env, worker_command
from infra import keys
from infra.artifacts import MANIFEST, ArtifactStore
from infra.datasets import DatasetRegistry
from infra.jobs import JobRecord, JobStore, wait_for
from infra.redis_client import connect
from infra.redis_server import RedisServer
from infra.registry import Registry
from infra.settings import Settings
from regcl.adapters import read_adapter
from regcl.client import Activation, ApiConnectionError, ApiError, ProtocolError, Segmentation
from tests.conftest import free_tcp_port
from tests.service.api_support import ADMIN_KEY, ApiServer, server_env
from tests.workers.worker_support import JOB_TIMEOUT_S, START_TIMEOUT_S, write_domain_dataset
from workers.celery_app import make_celery
from workers.reaper import broker_messages

MORE_FAULTS_ENV = "REGCL_TEST_MORE_FAULTS"
more_faults = pytest.mark.skipif(
    os.environ.get(MORE_FAULTS_ENV) != "1",
    reason=f"a fault case beyond the suite's time budget (20-40 s); opt in with "
           f"{MORE_FAULTS_ENV}=1")
"""Marks a fault case the suite skips unless ``REGCL_TEST_MORE_FAULTS=1``."""

LEASE_S = 3.0
REAPER_INTERVAL_S = 1.0
BOX = [10.0, 8.0, 90.0, 70.0]


def say(message: str) -> None:
    """A figure for the reader of ``pytest -s`` (and docs/reliability.md)."""
    print(f"[reliability] {message}", flush=True)


def poll(predicate: Callable[[], bool], what: str, timeout_s: float = JOB_TIMEOUT_S,
         interval_s: float = 0.05, on_timeout: Callable[[], str] = lambda: "") -> float:
    """Wait until ``predicate()``; the seconds it took (fails the test on a timeout)."""
    start = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except (redis.exceptions.ConnectionError, ApiConnectionError):
            pass
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"timed out waiting for {what}\n{on_timeout()}")
        time.sleep(interval_s)


@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, nothing is acknowledged or requeued."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class Rig:
    """A private Redis + workers + API servers under ``root`` (see the module doc)."""

    root: Path
    redis_server: RedisServer = field(init=False)
    settings: Settings = field(init=False)
    workers: list[Worker] = field(default_factory=list)
    apis: list[ApiServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.redis_server = RedisServer(self.root / "redis", free_tcp_port()).start()
        self.settings = Settings(
            redis_url=self.redis_server.url, data_dir=self.root / "data", model="tiny",
            job_lease_s=LEASE_S, reaper_interval_s=REAPER_INTERVAL_S, queued_grace_s=5.0,
            merge_lock_lease_s=LEASE_S, job_visibility_timeout_s=3600)
        self.client = connect(self.settings.redis_url)
        self.store = ArtifactStore(self.settings.artifact_url)
        self.jobs = JobStore(self.client)
        self.registry = Registry(self.client, self.store)
        self.datasets = DatasetRegistry(self.client, self.store)
        self.celery = make_celery(self.settings)

    # -- processes -------------------------------------------------------------------------------

    def start_workers(self, *names: str, env: dict[str, str] | None = None) -> list[Worker]:
        """Worker processes (started together), each consuming once this returns."""
        started = []
        for name in names:
            log = self.root / f"worker-{name}.log"
            penv = {**os.environ, **settings_env(self.settings), "REGCL_TORCH_THREADS": "1",
                    "PYTHONPATH": str(REPO_ROOT), **(env or {})}
            command = worker_command(hostname=f"{name}@localhost",
                                     extra=["--without-gossip", "--without-mingle"])
            with open(log, "ab") as out:
                process = subprocess.Popen(command, env=penv, cwd=REPO_ROOT, stdout=out,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            started.append(Worker(name, process, log))
        self.workers.extend(started)
        for worker in started:
            marker = f"{worker.name}@localhost ready."
            poll(lambda w=worker, m=marker: m in w.log.read_text(errors="replace")
                 or w.process.poll() is not None, f"worker {worker.name} to start",
                 START_TIMEOUT_S, 0.2)
            assert worker.process.poll() is None, self.log_tails()
        return started

    def start_api(self, **overrides: str) -> ApiServer:
        data_dir = self.root / f"api-{len(self.apis)}"
        data_dir.mkdir()
        env = server_env(self.settings.redis_url, data_dir,
                         REGCL_ARTIFACT_URL=self.settings.artifact_url, **overrides)
        server = ApiServer(env, data_dir / "server.log")
        self.apis.append(server)
        return server.start()

    def crash_redis(self) -> None:
        """SIGKILL redis-server (no SHUTDOWN SAVE: only what its append-only file holds)."""
        process = self.redis_server._process
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        self.redis_server.stop()  # forgets the dead process

    def start_redis(self) -> float:
        """Start redis-server again on the same data directory and port; seconds it took."""
        start = time.monotonic()
        self.redis_server.start()
        return time.monotonic() - start

    def close(self) -> None:
        for server in self.apis:
            server.stop()
        codes = {w.name: w.stop() for w in self.workers}
        self.celery.close()
        self.client.close()
        self.redis_server.stop()
        if self.workers:
            say(f"worker exit codes: {codes}")

    # -- data and checks ---------------------------------------------------------------------

    def add_dataset(self, domain: str, count: int = 8) -> None:
        root = write_domain_dataset(self.root / "datasets" / domain, domain, count)
        self.datasets.add_dataset(domain, root, {"domain": domain})

    def wait(self, job: JobRecord | str, timeout_s: float = JOB_TIMEOUT_S) -> JobRecord:
        job_id = job if isinstance(job, str) else job.id
        try:
            return wait_for(self.jobs, job_id, timeout_s, poll_s=0.1)
        except TimeoutError:
            pytest.fail(f"job {job_id} did not finish: {self.jobs.get(job_id)}\n"
                        f"{self.log_tails()}")

    def log_tails(self, lines: int = 40) -> str:
        out = []
        for worker in self.workers:
            text = worker.log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- worker {worker.name} ---\n" + "\n".join(text))
        return "\n".join(out)

    def messages_of(self, job_id: str) -> int:
        """Broker messages of the job: waiting in a queue plus taken but unacknowledged."""
        waiting, unacked = broker_messages(self.client)
        return int(job_id in waiting) + len(unacked.get(job_id, []))

    def check_store(self) -> dict[str, int]:
        """Every index entry points at a complete artifact whose files match their digests
        and load; no directory under ``adapters/`` or ``versions/`` lacks its manifest. Returns
        counts (for the figures)."""
        scratch = self.root / f"check-{time.monotonic_ns()}"
        for record in self.registry.list_adapters():
            files = read_adapter(self.registry.fetch_adapter(record.name, scratch / "a"))
            assert files.weights, record.name
        for version in self.registry.list_versions():
            local = self.registry.fetch_version(version.number, scratch / "v")
            assert read_adapter(local / version.adapter_dir).weights
            assert (local / version.state_file).is_file()
        root = Path(self.settings.artifact_url)
        incomplete = [p for prefix in ("adapters", "versions") if (root / prefix).is_dir()
                      for p in (root / prefix).iterdir() if not (p / MANIFEST).is_file()]
        assert incomplete == [], f"directories without a manifest: {incomplete}"
        tmp = root / ".tmp"
        return {"adapters": len(self.registry.list_adapters()),
                "versions": len(self.registry.list_versions()),
                "staging_leftovers": len(list(tmp.iterdir())) if tmp.is_dir() else 0}


@pytest.fixture
def rig(tmp_path: Path):
    stack = Rig(tmp_path)
    try:
        yield stack
    finally:
        stack.close()


# -- HTTP load ---------------------------------------------------------------------------------


def segment(client, image: bytes, adapter: str = "live") -> Segmentation:
    """One box prompt on an inline image, with the mask's low-res logits."""
    return client.segment(image, box=BOX, multimask=False, adapter=adapter,
                          return_logits=True)


def logits_of(result: Segmentation) -> np.ndarray:
    return result.masks[0].low_res_logits


def activate(server: ApiServer, number: int) -> Activation:
    with server.api(ADMIN_KEY) as client:
        return client.activate(number)


def metric(server: ApiServer, name: str) -> float:
    """One unlabelled sample of ``/metrics``."""
    with server.api(timeout=30.0) as client:
        text = client.metrics()
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def rss_mib(server: ApiServer) -> float:
    assert server.process is not None
    return psutil.Process(server.process.pid).memory_info().rss / 2**20


@dataclass
class Outcome:
    """One request as a client saw it."""

    started: float
    ended: float
    status: int  # 0: no HTTP answer (connection refused or reset)
    version: str = ""
    image: int = -1
    logits: np.ndarray | None = None
    error: str = ""


class LoadClients:
    """``n`` threads, each posting ``/v1/segment`` for its images in turn until stopped."""

    def __init__(self, server: ApiServer, images: list[bytes], n: int) -> None:
        self.server = server
        self.images = images
        self.n = n
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(n)]

    def _run(self, index: int) -> None:
        turn = index
        with self.server.api() as client:
            while not self._stop.is_set():
                image = turn % len(self.images)
                turn += 1
                start = time.monotonic()
                try:
                    result = segment(client, self.images[image])
                except ApiConnectionError as exc:
                    outcome = Outcome(start, time.monotonic(), 0, image=image,
                                      error=type(exc.__cause__ or exc).__name__)
                    time.sleep(0.05)  # a refused connection returns at once; do not spin
                except ProtocolError as exc:  # header and body disagree
                    outcome = Outcome(start, time.monotonic(), 200, image=image, error=str(exc))
                except ApiError as exc:
                    outcome = Outcome(start, time.monotonic(), exc.status, image=image,
                                      error=str(exc)[:200])
                else:
                    outcome = Outcome(start, time.monotonic(), 200, result.adapter_version,
                                      image, logits_of(result))
                with self._lock:
                    self.outcomes.append(outcome)

    def __enter__(self) -> LoadClients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(180)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)


def reference_logits(server: ApiServer, images: list[bytes]) -> list[np.ndarray]:
    """What the server answers for each image with the live version, quietly, one at a time."""
    with server.api() as client:
        return [logits_of(segment(client, image)) for image in images]


def redis_keys(client: redis.Redis) -> set[str]:
    return {k for k in client.scan_iter(f"{keys.PREFIX}*")}
