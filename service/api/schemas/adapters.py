"""Schemas of ``/v1/adapters``. The upload itself is a multipart form (see the route)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from infra.registry import AdapterRecord


class AdapterInfo(BaseModel):
    """A domain adapter in the registry. ``has_stats``: it carries Gram statistics, so RegCL
    can merge it; without them it can still be served by name."""

    name: str
    domain: str | None
    sha256: str
    size_bytes: int
    files: list[str]
    has_stats: bool
    metadata: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, record: AdapterRecord) -> AdapterInfo:
        domain = record.metadata.get("domain")
        return cls(name=record.name, domain=domain if isinstance(domain, str) else None,
                   sha256=record.sha256, size_bytes=record.size_bytes, files=list(record.files),
                   has_stats=record.has_stats, metadata=record.metadata,
                   created_at=record.created_at)


class AdapterUploadResponse(BaseModel):
    """The adapter as stored."""

    adapter: AdapterInfo


class AdapterListResponse(BaseModel):
    adapters: list[AdapterInfo]


class AdapterDeleteResponse(BaseModel):
    name: str
    deleted: bool
