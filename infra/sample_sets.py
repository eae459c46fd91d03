"""Per-domain sample sets: annotations accumulated one by one, snapshotted into datasets.

Each Label Studio project is one domain. Its annotations arrive one at a time (webhooks), so
they are kept as an **append-only log** in Redis (``keys.samples(domain, "log")``): a ``put``
entry per created or updated annotation (its task, its image and its object masks) and a
``delete`` entry per deleted one. The current set is the log replayed: the latest ``put`` of
each annotation that no later ``delete`` removed. The pixels live in the artifact store as
content-addressed PNG blobs (``samples/<domain>/images/<image id>.png``,
``samples/<domain>/masks/<sha256>.png``), written before the log entry that names them, so
the log never names a missing file. Beside the log, ``keys.samples(domain, "versions")`` maps
each annotation the set holds to the version (Label Studio's ``updated_at``) its latest ``put``
stored, so the same version is not stored twice (:meth:`SampleSets.version_of`).

A training step turns the current set into ordinary immutable datasets
(:meth:`SampleSets.snapshot`): ``<domain>-s<n>-train`` and ``<domain>-s<n>-heldout``, folder
pairs, split by task (all masks of one image on the same side) with a seeded hash, so a task
stays on its side from one snapshot to the next (a held-out image is never trained on later).
A snapshot taken for a ``key`` (a continual step's job id) reserves its number and the log
length it covers under that key (``keys.samples(domain, "steps")``), so a rerun of the job
(its worker died) takes the same snapshot again: the same names, the same log entries, and the
datasets the killed attempt already stored are reused, not stored twice.
Project settings (the domain name, training parameters) live in ``keys.LS_PROJECTS``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import LockError

from infra import keys
from infra.artifacts import ArtifactStore
from infra.datasets import DatasetRecord, DatasetRegistry
from infra.errors import Conflict, LockTimeout, NotFound
from infra.names import MAX_DOMAIN_LENGTH, validate_name
from regcl.errors import DataError

__all__ = [
    "ProjectSettings",
    "SampleEntry",
    "SampleSets",
    "Snapshot",
    "default_domain",
    "split_tasks",
    "validate_domain_name",
]

logger = logging.getLogger(__name__)

_MAX_MASKS = 64


def validate_domain_name(name: object) -> str:
    """``name`` if it can name a sample set's domain (:mod:`infra.names`: not reserved, short
    enough for ``<domain>-s<n>-heldout``), else InvalidName."""
    return validate_name(name, "domain name", new=True, max_length=MAX_DOMAIN_LENGTH)


def default_domain(project_id: int) -> str:
    """The domain of a Label Studio project that did not name one: ``ls-<project id>``."""
    return f"ls-{int(project_id)}"


@dataclass(frozen=True)
class ProjectSettings:
    """What the backend's extra params set for a project: its domain and the parameters of
    its continual steps (``workers.params.ContinualParams``, checked by the caller)."""

    project: int
    domain: str
    step: dict[str, Any]


@dataclass(frozen=True)
class SampleEntry:
    """One annotation in a sample set: its task, image blob key and mask blob keys."""

    annotation: int
    task: int
    image: str
    masks: tuple[str, ...]


@dataclass(frozen=True)
class Snapshot:
    """A sample set frozen into two datasets. ``log_length``: log entries it covers."""

    seq: int
    train: DatasetRecord
    heldout: DatasetRecord
    log_length: int
    annotations: int


def _check_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise DataError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def split_tasks(tasks: Sequence[int], seed: int, fraction: float
                ) -> tuple[list[int], list[int]]:
    """(train, held-out) tasks: a task is held out when the hash of ``seed`` and its id falls
    below ``fraction``, so its side never changes as more tasks arrive; at least one task on
    each side (DataError with fewer than two tasks)."""
    unique = sorted(set(tasks))
    if len(unique) < 2:
        raise DataError(f"need annotated masks on at least 2 images (one to train on, one to "
                        f"hold out), got {len(unique)}")
    score = {t: int.from_bytes(hashlib.sha256(f"{seed}:{t}".encode()).digest()[:8], "big")
             / 2**64 for t in unique}
    held = [t for t in unique if score[t] < fraction]
    if not held:
        held = [min(unique, key=score.__getitem__)]
    if len(held) == len(unique):
        held.remove(max(held, key=score.__getitem__))
    return [t for t in unique if t not in held], held


class SampleSets:
    """Sample sets of every domain and the Label Studio project settings (see module doc)."""

    def __init__(self, client: redis.Redis, store: ArtifactStore,
                 datasets: DatasetRegistry) -> None:
        self._redis = client
        self.store = store
        self.datasets = datasets

    # -- projects ------------------------------------------------------------------------------

    def project(self, project_id: int) -> ProjectSettings:
        """The project's settings (its default domain and no step params if never set)."""
        project_id = _check_id(project_id, "project id")
        raw = self._redis.hget(keys.LS_PROJECTS, str(project_id))
        if raw is None:
            return ProjectSettings(project_id, default_domain(project_id), {})
        data = json.loads(raw)
        return ProjectSettings(project_id, data["domain"], dict(data.get("step", {})))

    def configured_projects(self) -> list[int]:
        """Ids of the projects whose settings were stored (setup with extra params)."""
        return sorted(int(p) for p in self._redis.hkeys(keys.LS_PROJECTS))

    def configure_project(self, project_id: int, domain: str | None,
                          step: Mapping[str, Any] | None) -> ProjectSettings:
        """Set the project's domain (None: the default) and step parameters (checked by the
        caller)."""
        project_id = _check_id(project_id, "project id")
        settings = ProjectSettings(project_id, validate_domain_name(
            domain if domain is not None else default_domain(project_id)), dict(step or {}))
        self._redis.hset(keys.LS_PROJECTS, str(project_id), json.dumps(
            {"domain": settings.domain, "step": settings.step}, allow_nan=False))
        return settings

    # -- samples -------------------------------------------------------------------------------

    def _blob(self, key: str, data: bytes) -> None:
        if not self.store.exists(key):
            with contextlib.suppress(Conflict):  # written meanwhile: the same content
                self.store.put_bytes(key, data)

    def put(self, domain: str, annotation: int, task: int, image_id: str, image_png: bytes,
            masks_png: Sequence[bytes], version: str | None = None) -> int:
        """Record annotation ``annotation`` of ``task`` (created or updated) with its object
        masks (PNG, the image's size) on ``image_png`` (image id: its content hash). Files
        first, then the log entry. ``version``: the annotation's update time as Label Studio
        states it (:meth:`version_of` then tells that this version is stored). Returns the
        log entries not yet in a snapshot."""
        validate_domain_name(domain)
        _check_id(annotation, "annotation id")
        _check_id(task, "task id")
        if not re.fullmatch(r"[0-9a-f]{64}", image_id):
            raise DataError(f"image id must be a sha256 hex digest, got {image_id!r}")
        if len(masks_png) > _MAX_MASKS:
            raise DataError(f"an annotation may hold {_MAX_MASKS} masks at most, got "
                            f"{len(masks_png)}")
        image_key = f"samples/{domain}/images/{image_id}.png"
        mask_keys = [f"samples/{domain}/masks/{hashlib.sha256(m).hexdigest()}.png"
                     for m in masks_png]
        self._blob(image_key, image_png)
        for key, data in zip(mask_keys, masks_png, strict=True):
            self._blob(key, data)
        if version is not None and (not isinstance(version, str) or len(version) > 64):
            raise DataError(f"an annotation's version must be a short string, got {version!r}")
        return self._append(domain, {"op": "put", "annotation": annotation, "task": task,
                                     "image": image_key, "masks": mask_keys,
                                     "version": version})

    def remove(self, domain: str, annotation: int) -> bool:
        """Record that ``annotation`` was deleted; False (nothing written) if the set does not
        hold it."""
        validate_domain_name(domain)
        if _check_id(annotation, "annotation id") not in self.entries(domain):
            return False
        self._append(domain, {"op": "delete", "annotation": annotation})
        return True

    def version_of(self, domain: str, annotation: int) -> str | None:
        """The version (update time) of ``annotation`` as the set holds it now; None when the
        set does not hold it, or holds it without a version."""
        raw = self._redis.hget(keys.samples(validate_domain_name(domain), "versions"),
                               str(_check_id(annotation, "annotation id")))
        return None if raw is None else (raw.decode() if isinstance(raw, bytes) else raw)

    def _append(self, domain: str, entry: dict[str, Any]) -> int:
        pipe = self._redis.pipeline(transaction=True)
        versions = keys.samples(domain, "versions")  # annotation -> version, beside the log
        if entry.get("version") is not None:
            pipe.hset(versions, str(entry["annotation"]), entry["version"])
        else:
            pipe.hdel(versions, str(entry["annotation"]))
        pipe.rpush(keys.samples(domain, "log"), json.dumps({**entry, "at": time.time()}))
        pipe.sadd(keys.SAMPLE_DOMAINS, domain)
        pipe.get(keys.samples(domain, "seen"))
        _, length, _, seen = pipe.execute()
        return int(length) - int(seen or 0)

    def entries(self, domain: str, upto: int | None = None) -> dict[int, SampleEntry]:
        """The current set: annotation id → entry, in the order annotations were first put;
        ``upto``: the set as the first ``upto`` log entries made it."""
        current: dict[int, SampleEntry] = {}
        end = -1 if upto is None else upto - 1
        for raw in self._redis.lrange(keys.samples(validate_domain_name(domain), "log"), 0, end):
            entry = json.loads(raw)
            if entry["op"] == "delete":
                current.pop(entry["annotation"], None)
            else:
                current[entry["annotation"]] = SampleEntry(
                    entry["annotation"], entry["task"], entry["image"], tuple(entry["masks"]))
        return current

    def pending(self, domain: str) -> int:
        """Log entries (puts and deletes) since the latest snapshot."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.llen(keys.samples(validate_domain_name(domain), "log"))
        pipe.get(keys.samples(domain, "seen"))
        length, seen = pipe.execute()
        return int(length) - int(seen or 0)

    def domains(self) -> list[str]:
        """Every domain with a sample set, sorted."""
        return sorted(d.decode() if isinstance(d, bytes) else d
                      for d in self._redis.smembers(keys.SAMPLE_DOMAINS))

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot(self, domain: str, *, seed: int, holdout: float,
                 work_dir: str | Path | None = None,
                 metadata: Mapping[str, Any] | None = None, key: str | None = None
                 ) -> Snapshot:
        """Freeze the current set into datasets ``<domain>-s<n>-train`` and ``-heldout``
        (split by task, see :func:`split_tasks`); DataError if there is too little. ``key``:
        a snapshot already taken (or begun) for this key is taken again, the same (see the
        module doc)."""
        validate_domain_name(domain)
        reserved = self._reserved(domain, key)
        length = (int(self._redis.llen(keys.samples(domain, "log"))) if reserved is None
                  else reserved[1])
        masked = {a: e for a, e in self.entries(domain, upto=length).items() if e.masks}
        train_tasks, held_tasks = split_tasks([e.task for e in masked.values()], seed, holdout)
        seq = self._reserve(domain, key, length) if reserved is None else reserved[0]
        info = {"domain": domain, "seq": seq, "seed": seed, "holdout": holdout,
                "log_length": length, **(metadata or {})}
        records = {}
        with tempfile.TemporaryDirectory(dir=work_dir, prefix="snapshot-") as tmp:
            for split, tasks in (("train", set(train_tasks)), ("heldout", set(held_tasks))):
                name = f"{domain}-s{seq}-{split}"
                if key is not None and (done := self._stored(name)) is not None:
                    logger.info("sample set %s: dataset %s was stored by an earlier attempt; "
                                "reused", domain, name)
                    records[split] = done
                    continue
                chosen = [e for e in masked.values() if e.task in tasks]
                root = Path(tmp) / split
                self._write_split(root, chosen)
                records[split] = self.datasets.add_dataset(name, root, {
                    **info, "split": split, "annotations": [e.annotation for e in chosen]})
        seen = keys.samples(domain, "seen")
        if int(self._redis.get(seen) or 0) < length:  # a rerun never moves it back
            self._redis.set(seen, length)
        logger.info("sample set %s: snapshot %d (%d train, %d held-out masks)", domain, seq,
                    records["train"].count, records["heldout"].count)
        return Snapshot(seq, records["train"], records["heldout"], length, len(masked))

    def _reserved(self, domain: str, key: str | None) -> tuple[int, int] | None:
        """(snapshot number, log length) that ``key`` reserved, if it did."""
        raw = None if key is None else self._redis.hget(keys.samples(domain, "steps"), key)
        if raw is None:
            return None
        data = json.loads(raw)
        return int(data["seq"]), int(data["log_length"])

    def _reserve(self, domain: str, key: str | None, length: int) -> int:
        """A new snapshot number, reserved for ``key`` with ``length`` if a key is given."""
        seq = int(self._redis.incr(keys.samples(domain, "seq")))
        if key is not None and not self._redis.hsetnx(
                keys.samples(domain, "steps"), key,
                json.dumps({"seq": seq, "log_length": length})):
            raise Conflict(f"a snapshot of {domain!r} for {key!r} is being taken right now")
        return seq

    def _stored(self, name: str) -> DatasetRecord | None:
        try:
            return self.datasets.get_dataset(name)
        except NotFound:
            return None

    def _write_split(self, root: Path, entries: Sequence[SampleEntry]) -> None:
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        for entry in entries:
            image = self.store.get_bytes(entry.image)
            for k, mask_key in enumerate(entry.masks):
                stem = f"a{entry.annotation}-{k}"
                (root / "images" / f"{stem}.png").write_bytes(image)
                (root / "masks" / f"{stem}.png").write_bytes(self.store.get_bytes(mask_key))

    # -- continual steps -----------------------------------------------------------------------

    def step_job(self, domain: str) -> str | None:
        """Id of the domain's latest continual-step job, if any."""
        raw = self._redis.get(keys.samples(validate_domain_name(domain), "job"))
        return None if raw is None else (raw.decode() if isinstance(raw, bytes) else raw)

    def set_step_job(self, domain: str, job_id: str) -> None:
        self._redis.set(keys.samples(validate_domain_name(domain), "job"), job_id)

    @contextlib.contextmanager
    def step_lock(self, domain: str) -> Iterator[None]:
        """Hold the lock under which a step for ``domain`` is submitted (LockTimeout if
        another request holds it for more than 10 s)."""
        lock = self._redis.lock(keys.samples_lock(validate_domain_name(domain)), timeout=30,
                                blocking_timeout=10, thread_local=False)
        if not lock.acquire():
            raise LockTimeout(f"a continual step of {domain!r} is being submitted right now")
        try:
            yield
        finally:
            with contextlib.suppress(LockError):
                lock.release()

