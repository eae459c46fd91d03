"""Schemas of ``/v1/jobs``. Parameters are validated by the workers' own models
(:mod:`workers.params`) when the job is submitted, so the API and the worker agree on them;
the document states those models (:mod:`service.api.schemas.documented`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infra.jobs import JobRecord
from service.api.schemas.documented import Name, NewName, documented_as
from workers.params import (
    DEFAULT_MERGE_METHOD,
    STATS_SUFFIX,
    EvaluateParams,
    MergeJobParams,
    StatsParams,
    TrainParams,
    integer,
)

JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TrainJobRequest(_Request):
    """Train a LoRA adapter for ``domain`` on ``dataset``; it is registered as
    ``params.adapter`` (default: the domain)."""

    dataset: Name
    domain: NewName = Field(description="The image domain; also the adapter's name unless "
                            "params.adapter gives one (so not base, live or auto).")
    params: Annotated[dict[str, Any], documented_as(TrainParams)] = Field(
        default_factory=dict, description="Training parameters.")


class MergeJobRequest(_Request):
    """Fold ``adapters`` (in order) into the latest version's merge state; the result is a new
    version, made live when ``activate``. Documented as :data:`MERGE_JOB_SCHEMA` (one form
    per merge method, with that method's parameters)."""

    adapters: list[str] = Field(min_length=1, max_length=64)
    method: str = Field(default=DEFAULT_MERGE_METHOD, max_length=64)
    params: dict[str, Any] | None = None
    activate: bool = False
    fresh: bool = Field(default=False, description="Start from an empty merge state.")


MERGE_JOB_SCHEMA = documented_as(MergeJobParams, title="MergeJobRequest",
                                 description=MergeJobRequest.__doc__)


class EvaluateJobRequest(_Request):
    """Score a merged ``version``, or an ``adapter``, or (neither) the base model on
    ``datasets``."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"anyOf": [
        {"properties": {"version": {"type": "null"}}},
        {"properties": {"adapter": {"type": "null"}}}]})  # not both

    datasets: list[Name] = Field(min_length=1, max_length=16,
                                 json_schema_extra={"uniqueItems": True})
    version: integer(ge=1) | None = None  # type: ignore[valid-type]
    adapter: Name | None = None
    params: Annotated[dict[str, Any] | None, documented_as(EvaluateParams, nullable=True)] \
        = None


class StatsJobRequest(_Request):
    """Compute Gram statistics for ``adapter`` on ``dataset``; the result is a new adapter
    (``params.output``, default ``<adapter>-stats``: without an output name, the adapter's name
    has at most 58 characters)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"anyOf": [
        {"required": ["params"], "properties": {"params": {
            "type": "object", "required": ["output"],
            "properties": {"output": {"type": "string"}}}}},
        {"properties": {"adapter": {"maxLength": 64 - len(STATS_SUFFIX)}}}]})

    adapter: Name
    dataset: Name
    params: Annotated[dict[str, Any] | None, documented_as(StatsParams, nullable=True)] = None


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
