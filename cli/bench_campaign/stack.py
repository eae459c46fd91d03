"""The real stack a campaign runs against, in a private directory on free ports:
``redis-server`` (:class:`~infra.redis_server.RedisServer`), one Celery worker process (the
continual steps) and the API process (uvicorn), as ``regcl up`` starts them, with Label Studio
= the bench's image origin (:class:`~cli.bench_campaign.origin.ImageOrigin`)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cli.bench_serve.stack import REPO_ROOT, free_port

logger = logging.getLogger(__name__)

__all__ = ["CampaignStack", "campaign_stack"]

ORIGIN_TOKEN = "campaign-origin-token"  # the origin ignores it; the backend must send one


@dataclass
class CampaignStack:
    url: str
    admin_key: str
    data_dir: Path
    api_log: Path
    worker_log: Path

    def log_tails(self, lines: int = 30) -> str:
        parts = []
        for path in (self.api_log, self.worker_log):
            tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def _start(argv: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    with open(log_file, "ab") as log:
        return subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen[bytes], grace_s: float) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for(what: str, ready: object, processes: list[subprocess.Popen[bytes]],
              timeout_s: float, stack: CampaignStack) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"a stack process exited ({process.returncode}) before "
                                   f"{what}\n{stack.log_tails()}")
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s\n{stack.log_tails()}")


@contextlib.contextmanager
def campaign_stack(work_dir: Path, origin_url: str, *, model: str = "tiny",
                   worker_threads: int = 2, api_threads: int = 1,
                   ready_timeout_s: float = 600.0) -> Iterator[CampaignStack]:
    """Start Redis, the worker and the API in ``work_dir``; yields the stack; stops them."""
    from cli.up import api_command, settings_env, worker_command
    from infra.redis_server import RedisServer
    from infra.settings import Settings
    from regcl.client import Client
    from regcl.errors import RegclError

    admin_key = secrets.token_hex(16)
    settings = Settings(data_dir=work_dir / "data", redis_port=free_port(),
                        api_port=free_port(), model=model, admin_keys=(admin_key,),
                        label_studio_url=origin_url, label_studio_api_key=ORIGIN_TOKEN)
    stack = CampaignStack(f"http://{settings.api_host}:{settings.api_port}", admin_key,
                          settings.data_dir, work_dir / "api.log", work_dir / "worker.log")
    base_env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                            os.environ.get("PYTHONPATH")]))}
    hostname = f"campaign-{os.getpid()}@localhost"
    with RedisServer(settings.data_dir / "redis", settings.redis_port):
        threads = {"OMP_NUM_THREADS": str(worker_threads), "MKL_NUM_THREADS": str(worker_threads)}
        worker = _start(worker_command(hostname=hostname), {**base_env, **threads},
                        stack.worker_log)
        api = None
        try:
            threads = {"OMP_NUM_THREADS": str(api_threads), "MKL_NUM_THREADS": str(api_threads),
                       "REGCL_SERVE_THREADS": str(api_threads)}
            api = _start(api_command(settings), {**base_env, **threads}, stack.api_log)

            def worker_ready() -> bool:
                return stack.worker_log.exists() and f"{hostname} ready." in \
                    stack.worker_log.read_text(errors="replace")

            def api_ready() -> bool:
                with contextlib.suppress(RegclError), Client(stack.url, timeout=2.0) as c:
                    return c.ready().ready
                return False

            _wait_for("the worker ready", worker_ready, [worker, api], ready_timeout_s, stack)
            _wait_for("the API ready", api_ready, [worker, api], ready_timeout_s, stack)
            logger.info("campaign stack up at %s (API pid %d, worker pid %d, in %s)",
                        stack.url, api.pid, worker.pid, work_dir)
            yield stack
        finally:
            if api is not None:
                _stop(api, 15.0)
            _stop(worker, 60.0)
