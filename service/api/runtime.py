"""What one API process holds while it runs: the model, the engine and the platform clients.

:func:`build_runtime` makes it once, in the app's lifespan; routes get it (or parts of it)
through the dependencies in :mod:`service.api.deps`. Nothing here connects at import time, and
building does not need Redis to be up: clients connect lazily, and the live follower keeps
retrying until Redis answers.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
import torch

from infra.artifacts import ArtifactStore
from infra.datasets import DatasetRegistry
from infra.errors import InsufficientStorage, is_out_of_space
from infra.jobs import JobStore
from infra.platform import connect_platform
from infra.redis_client import connect_async
from infra.registry import Registry
from infra.settings import Settings
from regcl.errors import RegclError
from regcl.models import build_sam
from regcl.models.build import SAM_SPECS
from service.api.metrics import Metrics
from service.engine.embedding_store import DTYPES, EmbeddingStore
from service.engine.live_swap import DomainAdapters, LiveFollower, RouterFollower
from service.engine.onnx_export import DecoderOnnx
from service.engine.options import ServingOptions
from service.engine.segmentation import SegmentationEngine
from service.labelstudio.connection import check_settings as check_label_studio

__all__ = ["Runtime", "build_runtime"]

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The serving process's long-lived objects (one per app)."""

    settings: Settings
    engine: SegmentationEngine
    redis: redis.Redis
    aredis: aioredis.Redis
    store: ArtifactStore
    registry: Registry
    jobs: JobStore
    datasets: DatasetRegistry
    celery: Any | None  # celery.Celery; None when the workers package is not installed
    metrics: Metrics
    live: LiveFollower
    router: RouterFollower
    decoder: DecoderOnnx  # decoder.onnx for browsers, exported on first request
    cache_dir: Path
    upload_dir: Path

    @property
    def mask_input_side(self) -> int:
        """Side of SAM's low-res mask logits (``mask_input``): 4 x the embedding size."""
        return SAM_SPECS[self.settings.model].mask_input_side

    @contextlib.contextmanager
    def scratch_dir(self, prefix: str) -> Iterator[Path]:
        """A private temporary directory for one upload, removed afterwards.

        The library's errors name the files they refuse; raised from here, their messages
        name them relative to the upload (server paths never reach a client). A write refused
        for want of space is InsufficientStorage (nothing of the upload is kept)."""
        try:
            self.upload_dir.mkdir(parents=True, exist_ok=True)
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.upload_dir))
        except OSError as exc:
            if is_out_of_space(exc):
                raise InsufficientStorage("no space left in the data directory for the "
                                          "upload") from exc
            raise
        try:
            yield path
        except OSError as exc:
            if is_out_of_space(exc) and not isinstance(exc, InsufficientStorage):
                raise InsufficientStorage("no space left in the data directory for the "
                                          "upload") from exc
            raise
        except RegclError as exc:
            scrubbed = _without_paths(exc, {str(path): "", str(self.settings.data_dir): ""})
            if scrubbed is exc:
                raise
            raise scrubbed from None
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Stop following the live pointer and close the sync clients (the async client is
        closed by the lifespan, on the event loop)."""
        self.live.stop()
        self.router.stop()
        self.engine.close()
        self.redis.close()


def _without_paths(exc: RegclError, prefixes: dict[str, str]) -> RegclError:
    """``exc`` with each prefix path in its message replaced (a new exception of the same
    type), or ``exc`` itself when its message names none."""
    message = str(exc)
    cleaned = message
    for prefix, replacement in prefixes.items():
        cleaned = cleaned.replace(prefix + "/", replacement).replace(prefix, replacement or ".")
    if cleaned == message:
        return exc
    try:
        return type(exc)(cleaned)
    except Exception:  # an error type with another constructor: keep it as it is
        return exc


def _make_celery(settings: Settings) -> Any | None:
    try:
        from workers.celery_app import make_celery
    except ImportError as exc:
        logger.warning("job submission disabled: cannot import workers.celery_app (%s)", exc)
        return None
    return make_celery(settings)


def serving_options(settings: Settings) -> ServingOptions:
    """The engine's device, precision, attention, compile and batching from the settings."""
    dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
    attention = {"auto": None, "sdpa": True, "original": False}
    return ServingOptions(device=settings.device, dtype=dtypes[settings.serve_dtype],
                          sdpa=attention[settings.serve_attention],
                          compile=settings.serve_compile,
                          max_batch=settings.encoder_batch_size,
                          max_wait_ms=settings.encoder_batch_wait_ms,
                          threads=settings.serve_threads)


def build_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    """Load the model, build the engine and the platform clients (blocking: run it in a
    thread). The live adapter is not loaded here (see :meth:`LiveFollower.sync`)."""
    check_label_studio(settings)  # a bad URL, token or storage host stops the start, clearly
    platform = connect_platform(settings)
    cache_dir = settings.data_dir / "cache" / "service"
    cache_dir.mkdir(parents=True, exist_ok=True)
    sam = build_sam(settings.model, settings.checkpoint)
    engine = SegmentationEngine(sam, cache_bytes=settings.embedding_cache_bytes,
                                max_domains=settings.max_domain_adapters,
                                options=serving_options(settings),
                                domain_source=DomainAdapters(platform.registry, cache_dir),
                                route_min_margin=settings.route_min_margin,
                                route_max_novelty=settings.route_max_novelty)
    fingerprint = engine.adapters.base_fingerprint  # hashed now, not while a request waits
    logger.info("serving %s on %s (base fingerprint %s; %s)", settings.model,
                settings.device, fingerprint, engine.options)
    engine.use_store(EmbeddingStore(platform.store, fingerprint,
                                    DTYPES[settings.embedding_store_dtype]))
    metrics.attach_engine(engine)
    return Runtime(
        settings=settings, engine=engine, redis=platform.redis,
        aredis=connect_async(settings.redis_url), store=platform.store,
        registry=platform.registry, jobs=platform.jobs, datasets=platform.datasets,
        celery=_make_celery(settings), metrics=metrics,
        live=LiveFollower(engine, platform.registry, cache_dir, metrics),
        router=RouterFollower(engine, platform.registry, cache_dir),
        decoder=DecoderOnnx(engine, cache_dir),
        cache_dir=cache_dir, upload_dir=settings.data_dir / "tmp" / "uploads")
