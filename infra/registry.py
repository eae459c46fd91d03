"""The registry: domain adapters, merged versions and the live pointer.

Artifacts (files) live in the :class:`~infra.artifacts.ArtifactStore`; Redis holds the index.
Files are always stored *before* the index entry that points at them is written, and the index
entry is removed *before* the files, so the index never points at nothing:

- ``adapters/<name>``: a domain adapter directory (PEFT files + regcl stats + metadata JSON);
- ``versions/v<N>``: one merged version, holding ``adapter/`` (a PEFT adapter directory) and
  ``merge_state.safetensors`` (the :class:`~regcl.merging.state.ContinualMergeState` to fold the
  next domain into). Version numbers come from Redis INCR: strictly increasing, never reused,
  and a version's artifacts are never overwritten or deleted.

Merges serialise on :meth:`Registry.merge_lock`, a lease renewed by a heartbeat while its holder
works (so a dead merger's lock lapses within one lease, and a live one never loses it to a
timeout); :meth:`Registry.create_version` with ``fence=lock`` registers the version only if the
lock is still held by that holder, so a merger that lost its lock cannot publish a version built
on a stale parent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict
from redis.exceptions import LockError

from infra import keys
from infra.artifacts import ArtifactStore, files_of
from infra.errors import ConfigError, Conflict, LockTimeout, NotFound
from infra.heartbeat import lock_heartbeat
from infra.live import LiveSubscription, read_adapters_revision, read_live
from infra.named_artifacts import NamedArtifacts, fetch_artifact
from infra.names import validate_name
from regcl.adapters.layout import CONFIG_FILE, STATS_FILE, UNSAFE_SUFFIXES, WEIGHTS_FILE

__all__ = [
    "AdapterRecord",
    "MergeLockLost",
    "Registry",
    "VersionRecord",
]

logger = logging.getLogger(__name__)

VERSION_ADAPTER_DIR = "adapter"
VERSION_STATE_FILE = "merge_state.safetensors"
_MAX_SKIPPED_NUMBERS = 1000


def _adapter_name(name: str) -> str:
    return validate_name(name, "adapter name")


class MergeLockLost(Conflict):
    """The merge lock lapsed or was taken over while its holder merged: nothing is registered."""


def _adapter_files(local_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """The files of an adapter directory, after the checks that need no model (no torch)."""
    files = files_of(local_dir)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if f not in files]
    if missing:
        raise ConfigError(f"{local_dir} is not an adapter directory: missing {missing}")
    unsafe = sorted(rel for rel in files if rel.lower().endswith(UNSAFE_SUFFIXES))
    if unsafe:
        raise ConfigError(f"{local_dir}: refusing pickle-based files {unsafe}; use safetensors")
    return files


def _json_object(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    value = dict(value or {})
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be JSON-serialisable: {exc}") from exc
    return value


class AdapterRecord(BaseModel):
    """A domain adapter in the registry. ``sha256`` digests all its files."""

    model_config = ConfigDict(frozen=True)

    name: str
    artifact_key: str
    sha256: str
    size_bytes: int
    files: tuple[str, ...]
    has_stats: bool
    metadata: dict[str, Any]
    created_at: datetime


class VersionRecord(BaseModel):
    """A merged version. ``lineage`` says what it was made from (free JSON; suggested keys:
    ``parent`` version, ``domains`` folded in order, ``adapters`` name → sha256, ``method``,
    ``params``, ``job_id``)."""

    model_config = ConfigDict(frozen=True)

    number: int
    artifact_key: str
    sha256: str
    size_bytes: int
    lineage: dict[str, Any]
    created_at: datetime

    adapter_dir: str = VERSION_ADAPTER_DIR
    state_file: str = VERSION_STATE_FILE


class Registry:
    """Domain adapters, merged versions and the live pointer (Redis index + artifact store)."""

    def __init__(self, client: redis.Redis, store: ArtifactStore) -> None:
        self._redis = client
        self.store = store
        self._adapters = NamedArtifacts(
            client, store, kind="adapter", index_key=keys.ADAPTERS, lock_key=keys.adapter_lock,
            prefix="adapters", record_type=AdapterRecord, validate_name=_adapter_name)

    # -- domain adapters -----------------------------------------------------------------------

    def add_adapter(self, name: str, local_dir: str | os.PathLike[str],
                    metadata: Mapping[str, Any] | None = None) -> AdapterRecord:
        """Upload adapter directory ``local_dir`` as ``name`` (Conflict if the name is taken)."""
        validate_name(name, "adapter name", new=True)
        files = _adapter_files(local_dir)
        meta = _json_object(metadata, "adapter metadata")
        record = self._adapters.add(name, files, lambda info: AdapterRecord(
            name=name, artifact_key=info.key, sha256=info.sha256, size_bytes=info.size_bytes,
            files=tuple(sorted(info.files)), has_stats=STATS_FILE in info.files,
            metadata=meta, created_at=datetime.now(UTC)))
        self._adapters_changed(name)
        return record

    def get_adapter(self, name: str) -> AdapterRecord:
        """The adapter's record; NotFound if there is none."""
        return self._adapters.get(name)

    def list_adapters(self) -> list[AdapterRecord]:
        """Every adapter, sorted by name."""
        return self._adapters.list()

    def delete_adapter(self, name: str) -> None:
        """Remove the adapter (index first, then files). Versions merged from it keep their
        own copies and are untouched. NotFound if there is none."""
        self._adapters.delete(name)
        self._adapters_changed(name)

    def fetch_adapter(self, name: str, cache_dir: str | os.PathLike[str]) -> Path:
        """A local copy of the adapter directory under ``cache_dir`` (downloaded once per
        content digest, files checked). Treat it as read-only."""
        return self._adapters.fetch(name, cache_dir)

    def _adapters_changed(self, name: str) -> None:
        """Bump the adapters' revision and tell the followers (after the change, so a follower
        woken by it lists the new state)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.incr(keys.ADAPTERS_REVISION)
        pipe.publish(keys.ADAPTERS_CHANNEL, json.dumps({"name": name}))
        pipe.execute()

    def subscribe_adapters(self, callback: Callable[[int], None], *,
                           resync_interval_s: float = 5.0) -> LiveSubscription:
        """Start a listener thread calling ``callback(revision)`` once at start and after
        each adapter add or delete (:class:`~infra.live.LiveSubscription` on the adapters'
        channel); ``.stop()`` it when done."""
        return LiveSubscription(self._redis, callback, resync_interval_s=resync_interval_s,
                                channel=keys.ADAPTERS_CHANNEL,
                                read=read_adapters_revision).start()

    # -- merged versions -----------------------------------------------------------------------

    def create_version(self, local_adapter_dir: str | os.PathLike[str],
                       state_file: str | os.PathLike[str],
                       lineage: Mapping[str, Any] | None = None, *,
                       fence: redis.lock.Lock | None = None) -> VersionRecord:
        """Store a merged adapter + its merge state as the next version number.

        ``fence``: the merge lock this merge holds; the version is registered only if that
        lock is still ours at that moment (MergeLockLost otherwise; the stored files are then
        left unreferenced under their key, never served)."""
        adapter = _adapter_files(local_adapter_dir)
        state = Path(state_file)
        if not state.is_file():
            raise NotFound(f"merge state file not found: {state}")
        files: dict[str, Path] = {f"{VERSION_ADAPTER_DIR}/{rel}": p for rel, p in adapter.items()}
        files[VERSION_STATE_FILE] = state
        lineage = _json_object(lineage, "version lineage")
        for _ in range(_MAX_SKIPPED_NUMBERS):
            number = int(self._redis.incr(keys.VERSION_COUNTER))
            key = f"versions/v{number}"
            try:
                info = self.store.put_files(files, key)
            except Conflict:
                # Only if Redis lost its counter: never overwrite, take the next number.
                logger.warning("artifact %s already exists; skipping version number %d",
                               key, number)
                continue
            record = VersionRecord(number=number, artifact_key=key, sha256=info.sha256,
                                   size_bytes=info.size_bytes, lineage=lineage,
                                   created_at=datetime.now(UTC))
            if not self._register_version(record, fence):
                raise Conflict(f"version {number} is already registered")
            logger.info("version %d created (%d bytes)", number, info.size_bytes)
            return record
        raise Conflict(f"no free version number after {_MAX_SKIPPED_NUMBERS} tries")

    def _register_version(self, record: VersionRecord, fence: redis.lock.Lock | None) -> bool:
        """HSETNX the version's index entry, under the fence's check if one is given."""
        if fence is None:
            return bool(self._redis.hsetnx(keys.VERSIONS, str(record.number),
                                           record.model_dump_json()))
        token = fence.local.token
        token = token.decode() if isinstance(token, bytes) else token
        done: list[bool] = []

        def transaction(pipe: redis.client.Pipeline) -> None:
            done.clear()
            holder = pipe.get(keys.MERGE_LOCK)
            holder = holder.decode() if isinstance(holder, bytes) else holder
            if holder != token:
                raise MergeLockLost(
                    f"the merge lock was lost before version {record.number} was registered "
                    "(it lapsed or another merge holds it); the version is not registered")
            pipe.multi()
            pipe.hsetnx(keys.VERSIONS, str(record.number), record.model_dump_json())
            done.append(True)

        results = self._redis.transaction(transaction, keys.MERGE_LOCK)
        return bool(done) and bool(results[-1])

    def get_version(self, number: int) -> VersionRecord:
        """The version's record; NotFound if there is none."""
        raw = self._redis.hget(keys.VERSIONS, str(int(number)))
        if raw is None:
            raise NotFound(f"version {number} not found")
        return VersionRecord.model_validate_json(raw)

    def list_versions(self) -> list[VersionRecord]:
        """Every version, oldest (lowest number) first."""
        raw = self._redis.hgetall(keys.VERSIONS)
        return sorted((VersionRecord.model_validate_json(v) for v in raw.values()),
                      key=lambda r: r.number)

    def latest_version(self) -> VersionRecord | None:
        """The highest-numbered version (not necessarily the live one), or None."""
        numbers = [int(n) for n in self._redis.hkeys(keys.VERSIONS)]
        return self.get_version(max(numbers)) if numbers else None

    def fetch_version(self, number: int, cache_dir: str | os.PathLike[str]) -> Path:
        """A local copy of version ``number``: a directory with ``adapter/`` (load it with
        regcl.adapters) and ``merge_state.safetensors``. Treat it as read-only."""
        record = self.get_version(number)
        return fetch_artifact(self.store, record.artifact_key, record.sha256,
                              Path(cache_dir) / f"v{number}-{record.sha256[:16]}")

    # -- live pointer --------------------------------------------------------------------------

    def activate(self, number: int) -> VersionRecord:
        """Make version ``number`` the live one and notify followers (NotFound if absent)."""
        record = self.get_version(number)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(keys.LIVE, record.number)
        pipe.publish(keys.LIVE_CHANNEL, json.dumps({"version": record.number}))
        pipe.execute()
        logger.info("version %d is live", record.number)
        return record

    def live_version(self) -> int | None:
        """The live version number, or None if none was activated."""
        return read_live(self._redis)

    def subscribe_live(self, callback: Callable[[int], None], *, deliver_current: bool = True,
                       resync_interval_s: float = 5.0) -> LiveSubscription:
        """Start a listener thread calling ``callback(version)`` on each live change (see
        :class:`~infra.live.LiveSubscription`); ``.stop()`` it when done."""
        return LiveSubscription(self._redis, callback, deliver_current=deliver_current,
                                resync_interval_s=resync_interval_s).start()

    # -- merge lock ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def merge_lock(self, timeout_s: float,
                   blocking_timeout_s: float | None = None) -> Iterator[redis.lock.Lock]:
        """Hold the cluster-wide merge lock (merges serialise on it).

        ``timeout_s``: the lock's lease. A heartbeat thread renews it every third of that while
        the block runs, so it outlives any merge; if the holder dies it lapses within
        ``timeout_s``. ``blocking_timeout_s``: how long to wait for it (None: forever);
        LockTimeout when that passes. Pass the yielded lock to :meth:`create_version` as
        ``fence``.
        """
        lock = self._redis.lock(keys.MERGE_LOCK, timeout=timeout_s,
                                blocking_timeout=blocking_timeout_s, thread_local=False)
        if not lock.acquire():
            raise LockTimeout(f"merge lock still held after {blocking_timeout_s} s")
        heartbeat = lock_heartbeat(lock, timeout_s, "the merge lock")
        try:
            yield lock
        finally:
            heartbeat.stop()
            try:
                lock.release()
            except LockError:
                logger.error("merge lock lapsed while held (lease %.0f s, not renewed in time): "
                             "another merge may have started meanwhile", timeout_s)
