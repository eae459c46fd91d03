"""Uploaded domain datasets: validated once, stored as immutable artifacts, indexed in Redis.

A dataset is a directory in one of two layouts (see :func:`dataset_format`):

- ``folders``: ``images/`` and ``masks/`` paired by file stem (:class:`~regcl.data.folders.
  FolderPairDataset`: Kvasir-SEG, ISIC, CAMO, ... as they ship);
- ``coco``: ``annotations.json`` (COCO instances) + ``images/`` (:class:`~regcl.data.coco.
  CocoDataset`: one sample per annotated object).

It follows the rules of :class:`~infra.registry.Registry` for adapters: files are stored (at
``datasets/<name>``, atomically) *before* the index entry in ``keys.DATASETS`` points at them,
and the entry is removed *before* the files; names are unique and a dataset is never
overwritten; a per-name lock serialises an add and a delete of the same name.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import redis
from pydantic import BaseModel, ConfigDict
from redis.exceptions import LockError

from infra import keys
from infra.artifacts import ArtifactStore, files_of
from infra.errors import Conflict, InvalidName, NotFound
from infra.registry import ADAPTER_NAME, _json_object
from regcl.errors import DataError

if TYPE_CHECKING:  # the loaders import numpy / PIL / pycocotools; only open_dataset needs them
    from regcl.data.types import SampleDataset

__all__ = [
    "COCO_ANNOTATIONS",
    "DatasetFormat",
    "DatasetRecord",
    "DatasetRegistry",
    "dataset_format",
    "open_dataset",
    "validate_dataset_name",
]

logger = logging.getLogger(__name__)

DatasetFormat = Literal["folders", "coco"]
COCO_ANNOTATIONS = "annotations.json"
IMAGES_DIR = "images"
MASKS_DIR = "masks"
_LOCK_TIMEOUT_S = 3600


def validate_dataset_name(name: str) -> str:
    """Return ``name`` if it matches ``[a-z0-9][a-z0-9_-]{0,63}`` (as adapter names do)."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise InvalidName(f"invalid dataset name {name!r}: use [a-z0-9][a-z0-9_-]{{0,63}}")
    return name


def dataset_format(path: str | os.PathLike[str]) -> DatasetFormat:
    """The layout of the dataset directory ``path``; DataError if it is neither (or both)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"dataset directory {root} does not exist or is not a directory")
    has_coco = (root / COCO_ANNOTATIONS).is_file()
    has_images = (root / IMAGES_DIR).is_dir()
    has_masks = (root / MASKS_DIR).is_dir()
    if has_coco and has_masks:
        raise DataError(f"{root}: holds both {COCO_ANNOTATIONS} and {MASKS_DIR}/; a dataset "
                        "must be one layout (folder pairs or COCO), not both")
    if has_coco and has_images:
        return "coco"
    if has_masks and has_images:
        return "folders"
    raise DataError(
        f"{root}: not a dataset; expected {IMAGES_DIR}/ + {MASKS_DIR}/ (image/mask pairs by "
        f"file stem) or {COCO_ANNOTATIONS} + {IMAGES_DIR}/ (COCO instances)")


def open_dataset(path: str | os.PathLike[str], *, max_pixels: int | None = None
                 ) -> SampleDataset:
    """The dataset in ``path`` as a :class:`~regcl.data.types.SampleDataset`:
    FolderPairDataset or CocoDataset by layout (DataError if it is malformed or empty).
    ``max_pixels``: the largest image accepted (None: the loaders' default)."""
    from regcl.data.coco import CocoDataset
    from regcl.data.folders import FolderPairDataset
    from regcl.data.images import DEFAULT_MAX_PIXELS

    root = Path(path)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if dataset_format(root) == "coco":
        dataset: SampleDataset = CocoDataset(root / COCO_ANNOTATIONS, root / IMAGES_DIR,
                                             max_pixels=limit)
    else:
        dataset = FolderPairDataset(root, image_dir=IMAGES_DIR, mask_dir=MASKS_DIR,
                                    max_pixels=limit)
    if len(dataset) == 0:  # the loaders refuse this already; the registry relies on it
        raise DataError(f"{root}: the dataset has no samples")
    return dataset


class DatasetRecord(BaseModel):
    """A dataset in the registry. ``sha256`` digests all its files; ``count`` is its number
    of samples (objects, for COCO)."""

    model_config = ConfigDict(frozen=True)

    name: str
    artifact_key: str
    sha256: str
    size_bytes: int
    format: DatasetFormat
    count: int
    metadata: dict[str, Any]
    created_at: datetime


class DatasetRegistry:
    """Domain datasets (Redis index ``keys.DATASETS`` + artifacts under ``datasets/<name>``)."""

    def __init__(self, client: redis.Redis, store: ArtifactStore) -> None:
        self._redis = client
        self.store = store

    @contextlib.contextmanager
    def _lock(self, name: str, blocking_timeout_s: float | None) -> Iterator[None]:
        lock = self._redis.lock(keys.dataset_lock(name), timeout=_LOCK_TIMEOUT_S,
                                blocking_timeout=blocking_timeout_s, thread_local=False)
        if not lock.acquire():
            raise Conflict(f"dataset {name!r} is being added or deleted right now")
        try:
            yield
        finally:
            try:
                lock.release()
            except LockError:
                logger.error("dataset lock for %r expired before release", name)

    def add_dataset(self, name: str, local_dir: str | os.PathLike[str],
                    metadata: Mapping[str, Any] | None = None) -> DatasetRecord:
        """Validate the unpacked dataset in ``local_dir`` (it must open and hold samples) and
        store it as ``name``. Conflict if the name is taken; DataError if it is malformed."""
        validate_dataset_name(name)
        meta = _json_object(metadata, "dataset metadata")
        root = Path(local_dir)
        fmt = dataset_format(root)
        links = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_symlink())
        if links:
            raise DataError(f"{root}: symbolic links are not allowed in a dataset ({links[:3]})")
        count = len(open_dataset(root))
        files = files_of(root)
        key = f"datasets/{name}"
        with self._lock(name, blocking_timeout_s=None):
            if self._redis.hexists(keys.DATASETS, name):
                raise Conflict(f"dataset {name!r} already exists")
            # Files without an index entry are leftovers of a crash between the two steps of an
            # earlier add or delete; the lock guarantees nobody else is using them.
            if self.store.delete(key):
                logger.warning("removed orphaned artifact %s (no index entry)", key)
            info = self.store.put_files(files, key)
            record = DatasetRecord(
                name=name, artifact_key=key, sha256=info.sha256, size_bytes=info.size_bytes,
                format=fmt, count=count, metadata=meta, created_at=datetime.now(UTC))
            if not self._redis.hsetnx(keys.DATASETS, name, record.model_dump_json()):
                raise Conflict(f"dataset {name!r} already exists")
        logger.info("dataset %s added (%s, %d samples, %d bytes)", name, fmt, count,
                    info.size_bytes)
        return record

    def get_dataset(self, name: str) -> DatasetRecord:
        """The dataset's record; NotFound if there is none."""
        raw = self._redis.hget(keys.DATASETS, validate_dataset_name(name))
        if raw is None:
            raise NotFound(f"dataset {name!r} not found")
        return DatasetRecord.model_validate_json(raw)

    def list_datasets(self) -> list[DatasetRecord]:
        """Every dataset, sorted by name."""
        raw = self._redis.hgetall(keys.DATASETS)
        return sorted((DatasetRecord.model_validate_json(v) for v in raw.values()),
                      key=lambda r: r.name)

    def delete_dataset(self, name: str) -> None:
        """Remove the dataset (index first, then files). Adapters trained on it are untouched.
        NotFound if there is none."""
        validate_dataset_name(name)
        with self._lock(name, blocking_timeout_s=10.0):
            if not self._redis.hdel(keys.DATASETS, name):
                raise NotFound(f"dataset {name!r} not found")
            self.store.delete(f"datasets/{name}")
        logger.info("dataset %s deleted", name)

    def fetch_dataset(self, name: str, cache_dir: str | os.PathLike[str]) -> Path:
        """A local copy of the dataset directory under ``cache_dir`` (downloaded once per
        content digest, files checked against the manifest). Treat it as read-only."""
        record = self.get_dataset(name)
        dest = Path(cache_dir) / f"{name}-{record.sha256[:16]}"
        if dest.is_dir():
            return dest
        if self.store.info(record.artifact_key).sha256 != record.sha256:
            raise Conflict(f"artifact {record.artifact_key!r} does not match its dataset record")
        try:
            return self.store.get_dir(record.artifact_key, dest)
        except Conflict:
            if dest.is_dir():  # another process fetched the same digest meanwhile
                return dest
            raise
