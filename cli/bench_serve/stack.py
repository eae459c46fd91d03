"""A running regcl stack for ``regcl bench serve`` (when no ``--url`` is given).

The real serving stack, as ``regcl up`` starts it minus the worker (serving needs none): an
embedded ``redis-server``, the artifact store and registry, and the API process
(``uvicorn service.app:create_app``), all in a private temporary directory on free ports.
Two live versions with random LoRA weights are registered (version 1 is made live before the
API starts), so hot swaps and LoRA overhead can be measured.

The platform packages (``infra``, and ``regcl up``'s command lines from :mod:`cli.up`) are
imported inside :func:`running_stack` only, so the in-process sections of the benchmark start
without them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["Stack", "free_port", "running_stack", "write_random_adapter"]

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    url: str
    admin_key: str
    versions: list[int] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)  # domain adapters registered (auto rows)
    log_file: Path | None = None
    pid: int | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_random_adapter(model: str, directory: Path, seed: int,
                         checkpoint: str | Path | None = None) -> Path:
    """A LoRA adapter (regcl's default placement and rank) with random non-zero weights for
    ``model``, saved as a PEFT adapter directory."""
    import torch

    from regcl.adapters import AdapterConfig, attach_lora, save_adapter
    from regcl.models.build import SAM_SPECS, build_sam_from_spec

    torch.manual_seed(seed)
    peft_model = attach_lora(build_sam_from_spec(SAM_SPECS[model]), AdapterConfig())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return save_adapter(peft_model, directory, metadata={"bench_seed": seed})


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float, domains: int = 0
                ) -> None:
    from regcl.client import Client
    from regcl.errors import RegclError

    deadline = time.monotonic() + timeout_s
    with Client(url, timeout=2.0) as api:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the API process exited with {process.returncode}")
            with contextlib.suppress(RegclError):
                readiness = api.ready()
                if readiness.ready and readiness.served_version == 1 and (
                        not domains or len(api.router().domains) == domains):
                    return
            time.sleep(0.5)
    raise TimeoutError(f"the API at {url} was not ready (serving version 1, {domains} "
                       f"domains routed) within {timeout_s:.0f} s")


@contextlib.contextmanager
def running_stack(work_dir: Path, *, model: str, checkpoint: str | Path | None,
                  env: dict[str, str] | None = None, versions: int = 2,
                  domains: int = 0, stats_images: int = 24, device: str = "cpu",
                  ready_timeout_s: float = 900.0) -> Iterator[Stack]:
    """Start Redis and the API in ``work_dir``; yields the :class:`Stack`; stops both.

    ``env``: extra ``REGCL_*`` variables for the API (device, dtype, batching, threads...).
    ``domains``: register that many domain adapters with statistics
    (:func:`cli.bench_serve.auto_rows.write_domain_adapters`, on ``device``), for ``auto``.
    """
    from cli.up import api_command, settings_env
    from infra.platform import connect_platform
    from infra.redis_server import RedisServer
    from infra.settings import Settings

    admin_key = secrets.token_hex(16)
    settings = Settings(data_dir=work_dir / "data", redis_port=free_port(),
                        api_port=free_port(), model=model, checkpoint=checkpoint,
                        admin_keys=(admin_key,))
    log_file = work_dir / "api.log"
    with RedisServer(settings.data_dir / "redis", settings.redis_port) as server:
        registry = connect_platform(settings, server.client()).registry
        stack = Stack(url=f"http://{settings.api_host}:{settings.api_port}",
                      admin_key=admin_key, log_file=log_file)
        state = work_dir / "merge_state.safetensors"
        state.write_bytes(b"{}")  # never read: these versions are not merged into
        for index in range(versions):
            adapter = write_random_adapter(model, work_dir / f"adapter{index}", seed=index + 1)
            stack.versions.append(registry.create_version(
                adapter, state, lineage={"bench": "regcl bench serve"}).number)
        registry.activate(stack.versions[0])
        if domains:
            from cli.bench_serve.auto_rows import write_domain_adapters

            made = write_domain_adapters(model, checkpoint, work_dir / "domains", domains,
                                         stats_images, device)
            for name, directory in made.items():
                registry.add_adapter(name, directory)
                stack.domains.append(name)
        child_env = {**os.environ, **settings_env(settings), **(env or {}),
                     "PYTHONPATH": os.pathsep.join(filter(None, [
                         str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        with open(log_file, "ab") as log:
            process = subprocess.Popen(api_command(settings), env=child_env, cwd=REPO_ROOT,
                                       stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT)
        stack.pid = process.pid
        try:
            _wait_ready(stack.url, process, ready_timeout_s, len(stack.domains))
            logger.info("stack up at %s (API pid %d, log %s)", stack.url, process.pid,
                        log_file)
            yield stack
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
