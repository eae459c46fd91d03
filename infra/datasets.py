"""Uploaded domain datasets: validated once, stored as immutable artifacts, indexed in Redis.

A dataset is a directory in one of two layouts (see :func:`dataset_format`):

- ``folders``: ``images/`` and ``masks/`` paired by file stem (:class:`~regcl.data.folders.
  FolderPairDataset`: Kvasir-SEG, ISIC, CAMO, ... as they ship);
- ``coco``: ``annotations.json`` (COCO instances) + ``images/`` (:class:`~regcl.data.coco.
  CocoDataset`: one sample per annotated object).

Datasets are kept like adapters, as :class:`~infra.named_artifacts.NamedArtifacts` (files at
``datasets/<name>``, index in ``keys.DATASETS``; never overwritten).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import redis
from pydantic import BaseModel, ConfigDict

from infra import keys
from infra.artifacts import ArtifactStore, files_of
from infra.named_artifacts import NamedArtifacts
from infra.names import validate_name
from infra.registry import _json_object
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
    "verify_samples",
]

logger = logging.getLogger(__name__)

DatasetFormat = Literal["folders", "coco"]
COCO_ANNOTATIONS = "annotations.json"
IMAGES_DIR = "images"
MASKS_DIR = "masks"


def validate_dataset_name(name: object) -> str:
    """``name`` if it follows the naming rule (:mod:`infra.names`), else InvalidName."""
    return validate_name(name, "dataset name")


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


def verify_samples(dataset: SampleDataset) -> int:
    """Read every sample once (image decoded, mask decoded and matched to the image's size),
    so a stored dataset never fails later on a sample the loaders only open lazily; DataError
    naming the first bad sample. Returns the number of samples. One sample in memory at a
    time."""
    count = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample.mask.shape != sample.image.shape[:2]:  # the loaders check this; keep it true
            raise DataError(f"sample {sample.name!r}: mask {sample.mask.shape} does not match "
                            f"image {sample.image.shape[:2]}")
        count += 1
    return count


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
        self.store = store
        self._datasets = NamedArtifacts(
            client, store, kind="dataset", index_key=keys.DATASETS, lock_key=keys.dataset_lock,
            prefix="datasets", record_type=DatasetRecord, validate_name=validate_dataset_name)

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
        return self._datasets.add(name, files_of(root), lambda info: DatasetRecord(
            name=name, artifact_key=info.key, sha256=info.sha256, size_bytes=info.size_bytes,
            format=fmt, count=count, metadata=meta, created_at=datetime.now(UTC)))

    def get_dataset(self, name: str) -> DatasetRecord:
        """The dataset's record; NotFound if there is none."""
        return self._datasets.get(name)

    def list_datasets(self) -> list[DatasetRecord]:
        """Every dataset, sorted by name."""
        return self._datasets.list()

    def delete_dataset(self, name: str) -> None:
        """Remove the dataset (index first, then files). Adapters trained on it are untouched.
        NotFound if there is none."""
        self._datasets.delete(name)

    def fetch_dataset(self, name: str, cache_dir: str | os.PathLike[str]) -> Path:
        """A local copy of the dataset directory under ``cache_dir`` (downloaded once per
        content digest, files checked against the manifest). Treat it as read-only."""
        return self._datasets.fetch(name, cache_dir)
