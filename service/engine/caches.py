"""Thread-safe LRU stores bounded in bytes: image embeddings and uploaded images.

An entry's size is its ``nbytes`` (tensors and numpy arrays have it; :class:`EncodedImage`
sums its tensors). An entry larger than the whole budget is not stored, but the caller still
has it, so a request never fails because its image is too large to cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from regcl.errors import ConfigError


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=Sized)


@dataclass(frozen=True)
class CacheStats:
    """Counters since creation (hits, misses, evictions, oversize) and current occupancy."""

    entries: int
    nbytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    oversize: int


class ByteLRU(Generic[K, V]):
    """A least-recently-used map whose values' ``nbytes`` sum to at most ``max_bytes``.

    Every method takes one internal lock, so the map may be shared by threads. ``max_bytes=0``
    stores nothing (every ``get`` misses).
    """

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.oversize = 0

    def get(self, key: K) -> V | None:
        """The value (now most recently used) or None; counts a hit or a miss."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def peek(self, key: K) -> V | None:
        """The value or None, without counting or changing recency."""
        with self._lock:
            return self._entries.get(key)

    def put(self, key: K, value: V) -> bool:
        """Store ``value`` (replacing ``key``'s old value), evicting least recently used
        entries to fit. Returns False, storing nothing, if it alone exceeds ``max_bytes``."""
        size = int(value.nbytes)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= int(old.nbytes)
            if size > self.max_bytes:
                self.oversize += 1
                return False
            while self._entries and self._nbytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._nbytes -= int(evicted.nbytes)
                self.evictions += 1
            self._entries[key] = value
            self._nbytes += size
            return True

    def pop(self, key: K) -> V | None:
        with self._lock:
            value = self._entries.pop(key, None)
            if value is not None:
                self._nbytes -= int(value.nbytes)
            return value

    def drop_where(self, predicate: Callable[[K], bool]) -> int:
        """Remove every entry whose key satisfies ``predicate`` (not counted as evictions);
        returns how many were removed."""
        with self._lock:
            doomed = [k for k in self._entries if predicate(k)]
            for key in doomed:
                self._nbytes -= int(self._entries.pop(key).nbytes)
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    def lru_keys(self) -> list[K]:
        """A snapshot of the keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._entries), self._nbytes, self.max_bytes, self.hits,
                              self.misses, self.evictions, self.oversize)


@dataclass(frozen=True)
class EncodedImage:
    """One image's embedding under one adapter, with what ``SamPredictor.predict`` needs.

    features: 1 x C x h x w image embedding (``SamPredictor.features``), on the model's device.
    original_size: (H, W) of the image as uploaded. input_size: (H', W') after
    ``ResizeLongestSide`` (long side = the model's image size), before padding.
    adapter_version: the label of the adapter that produced it (``base``, ``live:3``,
    ``domain:polyp``). adapter_key: the engine's unique id of that adapter's weights.
    """

    image_id: str
    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    adapter_version: str
    adapter_key: str

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


class EmbeddingCache(ByteLRU[tuple[str, str], EncodedImage]):
    """Image embeddings keyed by ``(image_id, adapter_key)``.

    The key names the adapter's weights, so a hot swap makes the old version's embeddings
    unreachable by construction; :meth:`drop_adapter` frees their memory at once.
    """

    def drop_adapter(self, adapter_key: str) -> int:
        """Remove every embedding made with ``adapter_key``; returns how many."""
        return self.drop_where(lambda key: key[1] == adapter_key)
