"""What the serving engine reports: hot swaps and a snapshot of its counters.

:class:`~service.api.metrics.EngineCollector` exports :class:`EngineStats` to Prometheus at
scrape time; ``/v1/versions`` and the swap benchmark read :class:`SwapResult`.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from service.engine.caches import CacheStats

__all__ = ["EngineStats", "SwapLog", "SwapResult"]

SWAP_HISTORY = 64
"""Most recent swaps kept by :class:`SwapLog`."""


@dataclass(frozen=True)
class SwapResult:
    """One :meth:`~service.engine.adapter_table.AdapterTable.load_live` call. seconds: the
    whole call (checks, waiting for the lock, swap); locked_seconds: how long encoding was
    paused.
    swapped is False when the version was live already (nothing changed)."""

    version: int
    previous_version: int | None
    seconds: float
    locked_seconds: float
    dropped_embeddings: int
    swapped: bool = True


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics. domain_loads: domain adapters loaded so far (a reload after
    an eviction counts again). stored_loads / stored_writes: embeddings read from / written
    to the persisted embedding store (:mod:`service.engine.embedding_store`)."""

    embeddings: CacheStats
    images: CacheStats
    live_version: int | None
    domains: tuple[str, ...]
    encodes: int
    swaps: int
    last_swap: SwapResult | None
    domain_loads: int
    stored_loads: int = 0
    stored_writes: int = 0


class SwapLog:
    """The most recent swaps (up to :data:`SWAP_HISTORY`) and how many there were in all.
    Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recent: deque[SwapResult] = deque(maxlen=SWAP_HISTORY)
        self._count = 0

    def add(self, result: SwapResult) -> None:
        with self._lock:
            self._recent.append(result)
            self._count += 1

    def recent(self) -> list[SwapResult]:
        """Oldest first."""
        with self._lock:
            return list(self._recent)

    def last(self) -> tuple[SwapResult | None, int]:
        """The latest swap (or None) and the number of swaps so far."""
        with self._lock:
            return (self._recent[-1] if self._recent else None), self._count
