"""The platform clients of one process, built in one place: Redis, the artifact store and the
stores over them (adapter and version registry, job records, datasets).

The API (:func:`service.api.runtime.build_runtime`), the workers (:class:`workers.runtime.
WorkerRuntime`) and ``regcl bench serve``'s stack all take them from :func:`connect_platform`.
Nothing connects here: redis-py opens its connection on the first command.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from infra.artifacts import ArtifactStore
from infra.datasets import DatasetRegistry
from infra.jobs import JobStore
from infra.redis_client import connect
from infra.registry import Registry
from infra.settings import Settings

__all__ = ["Platform", "connect_platform"]


@dataclass(frozen=True)
class Platform:
    """The clients one process shares: all stores use the same Redis client and store."""

    redis: redis.Redis
    store: ArtifactStore
    registry: Registry
    jobs: JobStore
    datasets: DatasetRegistry


def connect_platform(settings: Settings, client: redis.Redis | None = None, *,
                     store_retry_s: float = 0.0) -> Platform:
    """The platform of ``settings`` (``redis_url``, ``artifact_url``); ``client``: an open
    Redis client to use instead of a new one; ``store_retry_s``: how long the artifact store
    tries an operation again while the store is unreachable (workers: ``settings.
    store_retry_s``; the API: 0, it answers 503 instead)."""
    client = client if client is not None else connect(settings.redis_url)
    store = ArtifactStore(settings.artifact_url, retry_s=store_retry_s)
    return Platform(redis=client, store=store, registry=Registry(client, store),
                    jobs=JobStore(client), datasets=DatasetRegistry(client, store))
