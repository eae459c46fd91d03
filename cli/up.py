"""``regcl up``: the whole service on one machine, in the foreground.

Starts, in order, and waits for each to be ready:

1. ``redis``: the embedded redis-server (:class:`~infra.redis_server.RedisServer`, persisting
   into ``<data_dir>/redis``), unless ``REGCL_REDIS_URL`` points elsewhere;
2. ``worker``: one Celery worker (``celery -A workers.celery_app worker --pool solo``) on every
   queue; ready once it logs ``<hostname> ready.`` (connected and consuming; a control ping
   would not do: a solo worker that picks up a requeued job at once answers no ping until the
   job ends);
3. ``api``: ``uvicorn service.app:create_app --factory``; ready once its port accepts
   connections (uvicorn binds only after the app's lifespan has loaded the model).

Each child gets the settings as ``REGCL_*`` variables and runs in its own session, so a Ctrl-C
in the terminal reaches only this supervisor, which then stops the children in reverse order:
the API, then the worker (SIGTERM: a running job stops at its next check and goes back to the
queue, to start again on the next ``regcl up``; SIGQUIT then SIGKILL if it will not go), then
Redis (``SHUTDOWN SAVE``). If any child dies, the others are stopped too and ``run_up`` returns
1 with a message naming it. Children's output is relayed line by line, prefixed with their name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pydantic import SecretStr

from infra.redis_server import RedisServer
from infra.settings import Settings
from workers.celery_app import ALL_QUEUES

__all__ = [
    "API_APP",
    "api_command",
    "run_up",
    "settings_env",
    "worker_command",
]

logger = logging.getLogger("regcl.up")

API_APP = "service.app:create_app"
REPO_ROOT = Path(__file__).resolve().parent.parent
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as the ``REGCL_*`` variables that rebuild them in a child process."""
    env: dict[str, str] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, tuple):  # admin_keys
            value = ",".join(v.get_secret_value() if isinstance(v, SecretStr) else str(v)
                             for v in value)
        elif isinstance(value, SecretStr):  # label_studio_api_key: the secret, not "****"
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"REGCL_{name.upper()}"] = str(value)
    return env


def worker_command(*, hostname: str = "regcl@%h", queues: Sequence[str] = ALL_QUEUES,
                   loglevel: str = "INFO", extra: Sequence[str] = ()) -> list[str]:
    """The command line of one worker process (solo pool: one process per GPU)."""
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
            "--pool", "solo", "--concurrency", "1", "-Q", ",".join(queues),
            "--hostname", hostname, "--loglevel", loglevel, *extra]


def api_command(settings: Settings, app: str = API_APP) -> list[str]:
    """The command line of the HTTP API (``create_app()`` builds its settings from the env)."""
    return [sys.executable, "-m", "uvicorn", app, "--factory", "--host", settings.api_host,
            "--port", str(settings.api_port)]


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    ready_marker: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    relay: threading.Thread = field(init=False)


class _Supervisor:
    """Child processes with their output relayed to ``out``, prefixed with their names."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.children: list[_Child] = []
        self._write_lock = threading.Lock()

    def say(self, name: str, line: str) -> None:
        with self._write_lock:
            self.out.write(f"{name:<6}| {line.rstrip()}\n")
            self.out.flush()

    def start(self, name: str, argv: list[str], env: dict[str, str],
              ready_marker: str | None = None) -> _Child:
        """Start ``argv``; its :attr:`_Child.ready` is set once a line of its output contains
        ``ready_marker``."""
        process = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        child = _Child(name, process, ready_marker)
        child.relay = threading.Thread(target=self._relay, args=(child,), daemon=True,
                                       name=f"relay-{name}")
        child.relay.start()
        self.children.append(child)
        logger.info("started %s (pid %d)", name, process.pid)
        return child

    def _relay(self, child: _Child) -> None:
        assert child.process.stdout is not None
        for raw in iter(child.process.stdout.readline, b""):
            line = raw.decode(errors="replace")
            if child.ready_marker is not None and child.ready_marker in line:
                child.ready.set()
            self.say(child.name, line)

    def dead(self) -> _Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def stop(self, child: _Child, steps: Sequence[tuple[int, float]]) -> None:
        """Send each (signal, seconds to wait) in turn until the child has exited."""
        for sig, wait_s in steps:
            if child.process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=wait_s)
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()
        child.relay.join(timeout=5)
        logger.info("%s stopped (exit code %s)", child.name, child.process.returncode)


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT / SIGTERM set ``stop`` (instead of raising) while inside; old handlers after."""
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_up(settings: Settings, *, api_app: str = API_APP, ready_timeout_s: float = 600.0,
           worker_grace_s: float = 60.0, out: IO[str] | None = None) -> int:
    """Run Redis (if embedded), one worker and the API until Ctrl-C / SIGTERM (returns 0) or
    until one of them dies or fails to get ready (stops the others, returns 1)."""
    stop = threading.Event()
    supervisor = _Supervisor(out or sys.stderr)
    embedded = settings.redis_url == f"redis://127.0.0.1:{settings.redis_port}/0"
    redis: RedisServer | None = None
    env = {**os.environ, **settings_env(settings),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    worker = api = None
    with _stop_on_signals(stop):
        try:
            if embedded:
                redis = RedisServer(settings.data_dir / "redis", settings.redis_port).start()
                logger.info("redis ready at %s (log: %s)", redis.url, redis.log_file)
            else:
                logger.info("using Redis at %s", settings.redis_url)
            hostname = f"regcl-up-{os.getpid()}@{socket.gethostname()}"
            worker = supervisor.start("worker", worker_command(hostname=hostname), env,
                                      ready_marker=f"{hostname} ready.")
            if not _wait_ready(supervisor, stop, ready_timeout_s, "worker", worker.ready.is_set):
                return 0 if stop.is_set() else 1
            api = supervisor.start("api", api_command(settings, api_app), env)
            if not _wait_ready(supervisor, stop, ready_timeout_s, "api",
                               lambda: _port_open(settings.api_host, settings.api_port)):
                return 0 if stop.is_set() else 1
            logger.info("regcl is up: API at http://%s:%d, data in %s; Ctrl-C stops it",
                        settings.api_host, settings.api_port, settings.data_dir)
            while not stop.wait(0.5):
                if _report_death(supervisor):
                    return 1
            logger.info("stopping")
            return 0
        finally:
            if api is not None:
                supervisor.stop(api, [(signal.SIGTERM, 15.0)])
            if worker is not None:
                supervisor.stop(worker, [(signal.SIGTERM, worker_grace_s),
                                         (signal.SIGQUIT, 10.0)])
            if redis is not None:
                redis.stop()


def _report_death(supervisor: _Supervisor) -> bool:
    child = supervisor.dead()
    if child is None:
        return False
    logger.error("%s exited unexpectedly with code %s; stopping the others", child.name,
                 child.process.returncode)
    return True


def _wait_ready(supervisor: _Supervisor, stop: threading.Event, timeout_s: float, name: str,
                ready: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        if _report_death(supervisor):
            return False
        if ready():
            logger.info("%s ready", name)
            return True
        if time.monotonic() > deadline:
            logger.error("%s not ready after %.0f s; stopping", name, timeout_s)
            return False
        stop.wait(1.0)
    return False
