"""Per-process state of a worker: settings, Redis and artifact clients, the base SAM.

Everything is made lazily, on the first task, in the process that runs it: with the solo pool
that is the worker process itself, and nothing here runs at import, so no Redis connection or
CUDA context is ever inherited across a fork. :func:`get_runtime` rebuilds the state if it finds
itself in a new process (a fork after first use).

Worker-only environment variables (the shared ones are :class:`~infra.settings.Settings`):

- ``REGCL_TORCH_THREADS``: torch intra-op threads (tests use 1; unset: torch's default);
- ``REGCL_WORKER_DEVICE``: ``cpu`` (default) or ``cuda[:n]``. Training, evaluation and Gram
  statistics run on the model's device (prompts are drawn on the CPU and moved, so a seed gives
  the same prompts on every device).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from infra.platform import Platform, connect_platform
from infra.settings import Settings
from regcl.errors import ConfigError

if TYPE_CHECKING:
    import redis
    import torch
    from segment_anything.modeling import Sam

    from infra.artifacts import ArtifactStore
    from infra.datasets import DatasetRegistry
    from infra.jobs import JobStore
    from infra.registry import Registry

__all__ = ["WorkerRuntime", "get_runtime"]

logger = logging.getLogger(__name__)

THREADS_ENV = "REGCL_TORCH_THREADS"
DEVICE_ENV = "REGCL_WORKER_DEVICE"


def configure_torch() -> None:
    """Apply ``REGCL_TORCH_THREADS`` (if set) before torch does any work in this process."""
    import torch

    threads = os.environ.get(THREADS_ENV, "").strip()
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise ConfigError(f"{THREADS_ENV} must be a positive integer, got {threads!r}")
        torch.set_num_threads(int(threads))
        logger.info("torch uses %s thread(s)", threads)


class WorkerRuntime:
    """What one worker process shares between its tasks (built lazily, used from one thread
    at a time with the solo pool; the model load is locked anyway)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._base: Sam | None = None
        self._fingerprint: str | None = None

    @cached_property
    def platform(self) -> Platform:
        """Redis, the artifact store and the stores over them (made on first use)."""
        return connect_platform(self.settings, store_retry_s=self.settings.store_retry_s)

    @property
    def redis(self) -> redis.Redis:
        return self.platform.redis

    @property
    def store(self) -> ArtifactStore:
        return self.platform.store

    @property
    def jobs(self) -> JobStore:
        return self.platform.jobs

    @property
    def registry(self) -> Registry:
        return self.platform.registry

    @property
    def datasets(self) -> DatasetRegistry:
        return self.platform.datasets

    @property
    def cache_dir(self) -> Path:
        """Local copies of adapters, versions and datasets (keyed by content digest)."""
        return self.settings.data_dir / "worker-cache"

    @contextlib.contextmanager
    def scratch_dir(self) -> Iterator[Path]:
        """A private temporary directory under ``data_dir``, removed afterwards."""
        root = self.settings.data_dir / "worker-tmp"
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            yield Path(tmp)

    @cached_property
    def device(self) -> torch.device:
        import torch

        return torch.device(os.environ.get(DEVICE_ENV, "cpu").strip() or "cpu")

    def base_model(self) -> Sam:
        """The base SAM of the deployment (``settings.model`` / ``checkpoint``), on the CPU,
        loaded once. Never modify it: take a :meth:`fresh_model`."""
        with self._lock:
            if self._base is None:
                from regcl.models.build import build_sam

                configure_torch()
                self._base = build_sam(self.settings.model, self.settings.checkpoint)
                logger.info("base model %s loaded", self.settings.model)
            return self._base

    def fresh_model(self) -> Sam:
        """A private copy of the base SAM on :attr:`device`, to attach LoRA to (PEFT wraps
        models in place, so tasks never share one)."""
        return copy.deepcopy(self.base_model()).to(self.device).eval()

    def base_fingerprint(self) -> str:
        """:func:`regcl.models.model_fingerprint` of the base model (computed once)."""
        if self._fingerprint is None:
            from regcl.models.build import model_fingerprint

            self._fingerprint = model_fingerprint(self.base_model())
        return self._fingerprint


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    """This process's runtime, built from ``Settings()`` (the environment) on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = WorkerRuntime(Settings())
            configure_torch()
        return _runtime
