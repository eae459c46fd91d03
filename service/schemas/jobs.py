"""Schemas of ``/v1/jobs``. Parameters are validated by the workers' own models
(:mod:`workers.params`) when the job is submitted, so the API and the worker agree on them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infra.jobs import JobRecord
from workers.params import DEFAULT_MERGE_METHOD

JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainJobRequest(_Request):
    """Train a LoRA adapter for ``domain`` on ``dataset``; it is registered as
    ``params.adapter`` (default: the domain)."""

    dataset: str = Field(max_length=64)
    domain: str = Field(max_length=64)
    params: dict[str, Any] = Field(default_factory=dict, description="Training parameters "
                                   "(rank, epochs, lr, ...; see workers.params.TrainParams).")


class MergeJobRequest(_Request):
    """Fold ``adapters`` (in order) into the latest version's merge state; the result is a new
    version, made live when ``activate``."""

    adapters: list[str] = Field(min_length=1, max_length=64)
    method: str = Field(default=DEFAULT_MERGE_METHOD, max_length=64)
    params: dict[str, Any] | None = None
    activate: bool = False
    fresh: bool = Field(default=False, description="Start from an empty merge state.")


class EvaluateJobRequest(_Request):
    """Score a merged ``version``, or an ``adapter``, or (neither) the base model on
    ``datasets``."""

    datasets: list[str] = Field(min_length=1, max_length=16)
    version: int | None = None
    adapter: str | None = Field(default=None, max_length=64)
    params: dict[str, Any] | None = None


class StatsJobRequest(_Request):
    """Compute Gram statistics for ``adapter`` on ``dataset``; the result is a new adapter
    (``params.output``, default ``<adapter>-stats``)."""

    adapter: str = Field(max_length=64)
    dataset: str = Field(max_length=64)
    params: dict[str, Any] | None = None


class JobErrorInfo(BaseModel):
    type: str
    message: str


class JobInfo(BaseModel):
    """A job as stored: state, progress in [0, 1] with a small ``detail``, and once finished
    its ``result`` or ``error``."""

    id: str
    kind: str
    state: JobStateName
    progress: float
    detail: dict[str, Any]
    params: dict[str, Any]
    result: Any = None
    error: JobErrorInfo | None = None
    cancel_requested: bool
    attempts: int
    worker: str | None = Field(default=None, description="The worker (Celery node name) "
                               "that started the latest attempt.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def of(cls, record: JobRecord) -> JobInfo:
        return cls.model_validate(record.model_dump(mode="json"))


class JobSubmitResponse(BaseModel):
    """The queued job (follow it at ``/v1/jobs/{id}`` or ``/v1/jobs/{id}/events``)."""

    job: JobInfo


class JobCancelResponse(BaseModel):
    """The job after the cancel request: ``cancelled`` if it was queued, else still running
    with ``cancel_requested`` until the worker stops."""

    job: JobInfo


class JobListResponse(BaseModel):
    jobs: list[JobInfo]
