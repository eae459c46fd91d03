"""An index of named, immutable artifacts: files in the :class:`~infra.artifacts.ArtifactStore`,
one JSON record per name in a Redis hash. Domain adapters and datasets are both kept this way.

The rules that keep the index honest: files are stored *before* the record that points at them
is written, and the record is removed *before* the files, so the index never points at nothing;
names are unique and an artifact is never overwritten; a per-name lock serialises an add and a
delete of the same name.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import redis
from pydantic import BaseModel
from redis.exceptions import LockError

from infra.artifacts import ArtifactInfo, ArtifactStore
from infra.errors import Conflict, NotFound
from infra.heartbeat import lock_heartbeat

logger = logging.getLogger(__name__)

_LOCK_TIMEOUT_S = 60.0
"""Lease of a per-name lock: renewed while its holder works, lapses this soon after it died
(a crashed upload must not block its name for long)."""


class _Record(Protocol):
    name: str
    artifact_key: str
    sha256: str


R = TypeVar("R", bound=BaseModel)


def fetch_artifact(store: ArtifactStore, key: str, sha256: str, dest: Path) -> Path:
    """A local copy of artifact ``key`` at ``dest``, downloaded once per content digest and
    checked against the digest the index recorded. Treat it as read-only."""
    if dest.is_dir():
        return dest
    if store.info(key).sha256 != sha256:
        raise Conflict(f"artifact {key!r} does not match its registry record")
    try:
        return store.get_dir(key, dest)
    except Conflict:
        if dest.is_dir():  # another process fetched the same digest meanwhile
            return dest
        raise


class NamedArtifacts(Generic[R]):
    """Records of type ``R`` (with ``name``, ``artifact_key``, ``sha256``) under ``index_key``,
    files under ``<prefix>/<name>``."""

    def __init__(self, client: redis.Redis, store: ArtifactStore, *, kind: str, index_key: str,
                 lock_key: Callable[[str], str], prefix: str, record_type: type[R],
                 validate_name: Callable[[str], str]) -> None:
        self._redis = client
        self.store = store
        self.kind = kind
        self._index = index_key
        self._lock_key = lock_key
        self._prefix = prefix
        self._record_type = record_type
        self._validate = validate_name

    def key(self, name: str) -> str:
        return f"{self._prefix}/{name}"

    @contextlib.contextmanager
    def lock(self, name: str, blocking_timeout_s: float | None) -> Iterator[None]:
        """Hold the per-name lock; ``None``: fail at once (Conflict) if someone else holds it."""
        lock = self._redis.lock(self._lock_key(name), timeout=_LOCK_TIMEOUT_S,
                                blocking=blocking_timeout_s is not None,
                                blocking_timeout=blocking_timeout_s, thread_local=False)
        if not lock.acquire():
            raise Conflict(f"{self.kind} {name!r} is being added or deleted right now")
        heartbeat = lock_heartbeat(lock, _LOCK_TIMEOUT_S, f"the lock of {self.kind} {name!r}")
        try:
            yield
        finally:
            heartbeat.stop()
            try:
                lock.release()
            except LockError:
                logger.error("%s lock for %r expired before release", self.kind, name)

    def add(self, name: str, files: dict[str, Path],
            make_record: Callable[[ArtifactInfo], R]) -> R:
        """Store ``files`` (relative path → local file) as ``name``, then index the record that
        ``make_record`` builds from the stored artifact's info. Conflict if the name is taken."""
        self._validate(name)
        key = self.key(name)
        with self.lock(name, blocking_timeout_s=None):
            if self._redis.hexists(self._index, name):
                raise Conflict(f"{self.kind} {name!r} already exists")
            # Files with no index entry are leftovers of a crash between the two steps of an
            # earlier add or delete; the lock guarantees nobody else is using them.
            if self.store.delete(key):
                logger.warning("removed orphaned artifact %s (no index entry)", key)
            info = self.store.put_files(files, key)
            record = make_record(info)
            if not self._redis.hsetnx(self._index, name, record.model_dump_json()):
                raise Conflict(f"{self.kind} {name!r} already exists")
        logger.info("%s %s added (%d bytes)", self.kind, name, info.size_bytes)
        return record

    def get(self, name: str) -> R:
        """The record of ``name``; NotFound if there is none."""
        raw = self._redis.hget(self._index, self._validate(name))
        if raw is None:
            raise NotFound(f"{self.kind} {name!r} not found")
        return self._record_type.model_validate_json(raw)

    def list(self) -> list[R]:
        """Every record, sorted by name."""
        raw = self._redis.hgetall(self._index)
        return sorted((self._record_type.model_validate_json(v) for v in raw.values()),
                      key=lambda r: r.name)

    def delete(self, name: str) -> None:
        """Remove ``name`` (index first, then files); NotFound if there is none."""
        self._validate(name)
        with self.lock(name, blocking_timeout_s=10.0):
            if not self._redis.hdel(self._index, name):
                raise NotFound(f"{self.kind} {name!r} not found")
            self.store.delete(self.key(name))
        logger.info("%s %s deleted", self.kind, name)

    def fetch(self, name: str, cache_dir: str | os.PathLike[str]) -> Path:
        """A local copy of ``name``'s files under ``cache_dir`` (see :func:`fetch_artifact`)."""
        record: _Record = self.get(name)  # type: ignore[assignment]
        return fetch_artifact(self.store, record.artifact_key, record.sha256,
                              Path(cache_dir) / f"{name}-{record.sha256[:16]}")
