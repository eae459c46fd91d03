"""Schemas of ``/v1/datasets``. The upload itself is a multipart form (see the route)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from infra.datasets import DatasetRecord


class DatasetInfo(BaseModel):
    """A stored dataset. ``format``: 'folders' (images/ + masks/) or 'coco'; ``count``: its
    samples (objects, for COCO)."""

    name: str
    format: Literal["folders", "coco"]
    count: int
    sha256: str
    size_bytes: int
    metadata: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, record: DatasetRecord) -> DatasetInfo:
        return cls(name=record.name, format=record.format, count=record.count,
                   sha256=record.sha256, size_bytes=record.size_bytes,
                   metadata=record.metadata, created_at=record.created_at)


class DatasetUploadResponse(BaseModel):
    """The dataset as stored (name, format, count and the rest of its record)."""

    name: str
    format: Literal["folders", "coco"]
    count: int
    dataset: DatasetInfo


class DatasetListResponse(BaseModel):
    datasets: list[DatasetInfo]


class DatasetDeleteResponse(BaseModel):
    name: str
    deleted: bool
