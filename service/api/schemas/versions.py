"""Schemas of ``/v1/versions``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from infra.registry import VersionRecord


class VersionInfo(BaseModel):
    """A merged version. ``lineage`` says what it was made from; ``live``: it is the version
    the live pointer names."""

    number: int
    sha256: str
    size_bytes: int
    lineage: dict[str, Any]
    created_at: datetime
    live: bool

    @classmethod
    def of(cls, record: VersionRecord, live_version: int | None) -> VersionInfo:
        return cls(number=record.number, sha256=record.sha256, size_bytes=record.size_bytes,
                   lineage=record.lineage, created_at=record.created_at,
                   live=record.number == live_version)


class VersionListResponse(BaseModel):
    versions: list[VersionInfo]
    live_version: int | None


class LiveVersionResponse(BaseModel):
    """The live pointer (shared by every replica) and what this process serves now."""

    live_version: int | None = Field(description="The version the pointer names (None: none "
                                     "activated yet; 'live' then means the base model).")
    served_version: int | None = Field(description="The version this process serves.")
    adapter_version: str = Field(description="What a 'live' request reports now.")
    last_swap_error: str | None = None


class ActivateResponse(BaseModel):
    """The version now live, the one before, and what this process serves after the swap."""

    version: VersionInfo
    previous_version: int | None
    served_version: int | None
    swap_seconds: float | None = Field(description="This process's swap (None: it was "
                                       "served already).")


class MatrixCell(BaseModel):
    """One score of the continual matrix: the newest succeeded evaluation of a row's model on
    a column's dataset (mean IoU / Dice / MAE with fixed random point prompts)."""

    iou: float
    dice: float | None = None
    mae: float | None = None
    count: int | None = None
    job_id: str
    finished_at: datetime | None = None


class MatrixColumn(BaseModel):
    """A dataset that was evaluated on; ``domain``: its domain, from the dataset's metadata or
    the adapter trained on it (None: unknown, or the dataset was deleted)."""

    dataset: str
    domain: str | None = None


class MatrixRow(BaseModel):
    """What was evaluated: ``base``, ``version:<n>`` or ``adapter:<name>``, with its scores by
    dataset (a dataset without an evaluation is absent)."""

    target: str
    version: int | None = None
    adapter: str | None = None
    live: bool = False
    scores: dict[str, MatrixCell]


class ContinualMatrixResponse(BaseModel):
    """The continual matrix (model × domain IoU) from the evaluation jobs still on record:
    rows are the base model, then versions by number, then single adapters by name."""

    columns: list[MatrixColumn]
    rows: list[MatrixRow]
    live_version: int | None
    jobs_scanned: int = Field(description="Succeeded evaluation jobs read (newest first).")
