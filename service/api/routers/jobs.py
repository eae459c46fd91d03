"""``/v1/jobs``: submit training, merge, evaluation and statistics jobs to the workers; follow
them (record, list, server-sent events); cancel them.

Submission goes through :mod:`workers.submit`, which validates the parameters (422
``invalid-argument``) and records the job before sending it. Names are looked up here first,
so a missing dataset, adapter or version is an immediate 404 rather than a failed job.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.convertors import Convertor, register_url_convertor

from infra import keys
from infra.base_model import check_base_model
from infra.errors import Conflict
from infra.jobs import JOB_ID_PATTERN, JOB_KIND_PATTERN, JobRecord, JobState, JobStore
from infra.names import validate_name
from infra.registry import Registry
from regcl.merging.catalogue import STATS_METHODS
from service.api.deps import (
    AdminKey,
    AsyncRedisDep,
    CeleryDep,
    DatasetsDep,
    EngineDep,
    JobStoreDep,
    RegistryDep,
    SettingsDep,
)
from service.api.errors import MissingStatsError
from service.api.problems import problem_responses
from service.api.schemas.documented import JobIdPath
from service.api.schemas.jobs import (
    MERGE_JOB_SCHEMA,
    EvaluateJobRequest,
    JobCancelResponse,
    JobInfo,
    JobListResponse,
    JobSubmitResponse,
    MergeJobRequest,
    StatsJobRequest,
    TrainJobRequest,
)
from service.api.uploads import name_taken
from workers.params import STATS_SUFFIX

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
logger = logging.getLogger(__name__)

SSE_HEARTBEAT_S = 15.0
SSE_RESYNC_S = 5.0
_SUBMIT = problem_responses(400, 401, 403, 404, 409, 422, 503)


class JobIdConvertor(Convertor[str]):
    """Path segments that are job ids (``infra.jobs.JOB_ID_PATTERN``)."""

    regex = JOB_ID_PATTERN

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("job_id", JobIdConvertor())  # /v1/jobs/train is not a job's path


def _submit() -> Any:
    from workers import submit  # imported on use: a deployment may run without workers

    return submit


def _refuse_taken_output(registry: Registry, name: object) -> None:
    """422 ``invalid-name`` or 409 now, rather than a job that fails at its end, if the
    adapter a job would register breaks the naming rule, is reserved, or exists already."""
    validate_name(name, "adapter name", new=True)
    if name_taken(lambda: registry.get_adapter(name)):
        raise Conflict(f"adapter {name!r} already exists; name the job's result otherwise")


class JobQueue:
    """A submit route's way to the workers: ``submit(submit_fn, **arguments)`` calls one of
    ``workers.submit``'s ``submit_*`` functions (which validate the parameters, record the job
    and send it), then answers 202 with the job and its ``Location``."""

    def __init__(self, celery: Any, jobs: JobStore, response: Response) -> None:
        self._celery, self._jobs, self._response = celery, jobs, response

    def submit(self, submit: Callable[..., JobRecord], **arguments: Any) -> JobSubmitResponse:
        record = submit(self._celery, self._jobs, **arguments)
        self._response.headers["Location"] = f"/v1/jobs/{record.id}"
        return JobSubmitResponse(job=JobInfo.of(record))


def _job_queue(celery: CeleryDep, jobs: JobStoreDep, response: Response) -> JobQueue:
    return JobQueue(celery, jobs, response)


QueueDep = Annotated[JobQueue, Depends(_job_queue)]


@router.post("/train", response_model=JobSubmitResponse, status_code=202,
             responses=_SUBMIT)
def submit_train(_: AdminKey, body: TrainJobRequest, registry: RegistryDep,
                 datasets: DatasetsDep, queue: QueueDep) -> JobSubmitResponse:
    """Queue the training of a domain adapter."""
    datasets.get_dataset(body.dataset)
    validate_name(body.domain, "domain", new=True)
    _refuse_taken_output(registry, body.params.get("adapter") or body.domain)
    return queue.submit(_submit().submit_train, dataset=body.dataset, domain=body.domain,
                        params=body.params)


@router.post("/merge", response_model=JobSubmitResponse, status_code=202,
             responses=_SUBMIT)
def submit_merge(_: AdminKey, body: Annotated[MergeJobRequest, MERGE_JOB_SCHEMA],
                 registry: RegistryDep, settings: SettingsDep, engine: EngineDep,
                 queue: QueueDep) -> JobSubmitResponse:
    """Queue a merge of adapters into a new version."""
    for name in body.adapters:
        record = registry.get_adapter(name)
        check_base_model(record.metadata, settings.model, engine.adapters.base_fingerprint,
                         f"adapter {name!r}")
        if body.method in STATS_METHODS and not record.has_stats:
            raise MissingStatsError(f"adapter {name!r} has no Gram statistics, "
                                    f"which {body.method!r} merges need: run a stats job for it "
                                    "first (POST /v1/jobs/stats)")
    return queue.submit(_submit().submit_merge, adapters=body.adapters, method=body.method,
                        params=body.params, activate=body.activate, fresh=body.fresh)


@router.post("/evaluate", response_model=JobSubmitResponse, status_code=202,
             responses=_SUBMIT)
def submit_evaluate(_: AdminKey, body: EvaluateJobRequest, registry: RegistryDep,
                    datasets: DatasetsDep, queue: QueueDep) -> JobSubmitResponse:
    """Queue an evaluation of a version, an adapter or the base model."""
    for name in body.datasets:
        datasets.get_dataset(name)
    if body.version is not None and body.adapter is None:
        registry.get_version(body.version)
    if body.adapter is not None and body.version is None:
        registry.get_adapter(body.adapter)
    return queue.submit(_submit().submit_evaluate, datasets=body.datasets, version=body.version,
                        adapter=body.adapter, params=body.params)


@router.post("/stats", response_model=JobSubmitResponse, status_code=202,
             responses=_SUBMIT)
def submit_stats(_: AdminKey, body: StatsJobRequest, registry: RegistryDep,
                 datasets: DatasetsDep, queue: QueueDep) -> JobSubmitResponse:
    """Queue the computation of Gram statistics for an adapter."""
    registry.get_adapter(body.adapter)
    datasets.get_dataset(body.dataset)
    output = (body.params or {}).get("output") or body.adapter + STATS_SUFFIX
    _refuse_taken_output(registry, output)
    return queue.submit(_submit().submit_stats, adapter=body.adapter, dataset=body.dataset,
                        params=body.params)


@router.get("", response_model=JobListResponse, responses=problem_responses(422, 503))
def list_jobs(jobs: JobStoreDep,
              kind: Annotated[str | None, Query(pattern=f"^{JOB_KIND_PATTERN}$")] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> JobListResponse:
    """The newest jobs (of one ``kind``: train, merge, evaluate, stats), newest first."""
    return JobListResponse(jobs=[JobInfo.of(r) for r in jobs.list(kind=kind, limit=limit)])


@router.get("/{job_id:job_id}", response_model=JobInfo, responses=problem_responses(404, 503))
def get_job(job_id: JobIdPath, jobs: JobStoreDep) -> JobInfo:
    """One job."""
    return JobInfo.of(jobs.get(job_id))


@router.post("/{job_id:job_id}/cancel", response_model=JobCancelResponse,
             responses=problem_responses(401, 403, 404, 409, 503))
def cancel_job(_: AdminKey, job_id: JobIdPath, jobs: JobStoreDep,
               celery: CeleryDep) -> JobCancelResponse:
    """Cancel a job: a queued one at once, a running one at its next check (409 if it has
    already finished)."""
    return JobCancelResponse(job=JobInfo.of(_submit().cancel_job(celery, jobs, job_id)))


def _sse(event: str, data: Any, event_id: int) -> bytes:
    payload = json.dumps(data, separators=(",", ":"))
    return f"id: {event_id}\nevent: {event}\ndata: {payload}\n\n".encode()


async def _job_events(request: Request, aredis: aioredis.Redis, jobs: JobStore,
                      job_id: str) -> AsyncIterator[bytes]:
    """The job's current record, then each published event, until it is finished.

    Subscribing comes before reading the record, so no event between the two is lost; the
    record is also re-read every few seconds (an event published while Redis was briefly
    unreachable is not lost either) and a comment line keeps proxies from timing out.
    """
    pubsub = aredis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.job_channel(job_id))
    try:
        record = await run_in_threadpool(jobs.get, job_id)
        event_id = 0
        yield _sse("snapshot", {"event": "snapshot", "job": record.model_dump(mode="json")},
                   event_id)
        last_state = record.state
        loop = asyncio.get_running_loop()
        last_sent = last_check = loop.time()
        while not last_state.terminal:
            if await request.is_disconnected():
                return
            message = await pubsub.get_message(timeout=1.0)
            now = loop.time()
            if message is not None and message.get("type") == "message":
                data = json.loads(message["data"])
                event_id += 1
                yield _sse(str(data.get("event", "update")), data, event_id)
                last_state = JobState(data["job"]["state"])
                last_sent = last_check = now
            elif now - last_check >= SSE_RESYNC_S:
                last_check = now
                record = await run_in_threadpool(jobs.get, job_id)
                if record.state != last_state:
                    event_id += 1
                    yield _sse(record.state.value, {"event": record.state.value,
                                                    "job": record.model_dump(mode="json")},
                               event_id)
                    last_state, last_sent = record.state, now
            if now - last_sent >= SSE_HEARTBEAT_S:
                last_sent = now
                yield b": keep-alive\n\n"
    finally:
        try:
            await pubsub.unsubscribe()
            await pubsub.aclose()
        except Exception:  # Redis gone: nothing left to release
            logger.debug("closing the job event subscription failed", exc_info=True)


@router.get("/{job_id:job_id}/events", response_class=StreamingResponse, response_model=None,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "Server-sent events: `snapshot` (the record), "
                             "then the job's events (`running`, `progress`, `succeeded`, "
                             "...), each with data `{event, job}`; ends when the job ends."},
                       **problem_responses(404, 503)})
async def job_events(job_id: JobIdPath, request: Request, aredis: AsyncRedisDep,
                     jobs: JobStoreDep) -> StreamingResponse:
    """Follow a job as server-sent events."""
    await run_in_threadpool(jobs.get, job_id)  # 404 before the stream starts
    return StreamingResponse(_job_events(request, aredis, jobs, job_id),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

