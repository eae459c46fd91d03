"""Job records in Redis: what was asked, where it stands, what came out.

Lifecycle (anything else raises :class:`~infra.errors.InvalidTransition`)::

    queued ──▶ running ──▶ succeeded | failed | cancelled
      │          ▲  │
      │          └──┘  (running → running: the queue redelivered the job after a worker died;
      │                 ``attempts`` counts the starts)
      └──▶ cancelled | failed

Terminal states are final. Cancellation is cooperative: :meth:`JobStore.request_cancel` cancels a
queued job at once and only raises a flag on a running one; the worker polls
:meth:`JobStore.cancel_requested` (or the record :meth:`JobStore.update_progress` returns), stops,
and calls :meth:`JobStore.mark_cancelled`.

Every change is PUBLISHed as JSON on ``keys.job_channel(id)`` and ``keys.JOB_EVENTS_CHANNEL``::

    {"event": "created|progress|running|succeeded|failed|cancelled|cancel_requested",
     "job": <JobRecord as JSON>}

Changes are WATCH/MULTI transactions, so concurrent writers never lose a transition.

Leases: a worker that starts a job with ``mark_running(id, lease_s=..., token=...)`` holds the
key ``keys.job_lease(id)`` (its token, expiring after ``lease_s``) and renews it while it works
(:meth:`JobStore.renew_lease`). A job that is ``running`` without a lease lost its worker
(SIGKILL, OOM, host loss): the reaper (:mod:`workers.reaper`) finds it among
:meth:`JobStore.active`. While the lease is held, another delivery of the same job (a duplicate
message) is refused by ``mark_running`` rather than run twice. Active (queued or running) job
ids are kept in ``keys.ACTIVE_JOBS`` so the reaper need not scan every job ever made.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict

from infra import keys
from infra.errors import ConfigError, Conflict, InvalidName, InvalidTransition, NotFound

__all__ = ["JobError", "JobRecord", "JobState", "JobStore", "wait_for"]

logger = logging.getLogger(__name__)

# Renew a lease only while it is ours; release likewise (a lost lease is never taken back).
# A lapsed lease is taken back only by the attempt it belonged to, and only while no later
# attempt has started (the job is still running with that attempt number): after a Redis outage
# longer than the lease, the worker that kept working resumes its lease, and a redelivery of the
# job that the reaper may have sent meanwhile is refused as a duplicate.
_RENEW_LEASE = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
if holder == false and ARGV[3] ~= '' then
  local job = redis.call('hmget', KEYS[2], 'state', 'attempts')
  if job[1] == 'running' and job[2] == ARGV[3] then
    redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
  end
end
return 0
"""
_RELEASE_LEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""

JOB_KIND_PATTERN = r"[a-z][a-z0-9_.-]{0,63}"
JOB_ID_PATTERN = r"[0-9a-f]{32}"
_KIND = re.compile(JOB_KIND_PATTERN)
_JOB_ID = re.compile(JOB_ID_PATTERN)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
_ACTIVE = frozenset({JobState.QUEUED, JobState.RUNNING})


class JobError(BaseModel):
    """Why a job failed: an error type (e.g. ``AdapterError``) and a human message."""

    model_config = ConfigDict(frozen=True)

    type: str
    message: str


class JobRecord(BaseModel):
    """One job as stored. ``progress`` is in [0, 1]; ``detail`` is small free-form JSON
    (``{"step": 40, "total": 200, "loss": 0.31}``); ``worker``: the worker (Celery node
    name) that started the latest attempt."""

    model_config = ConfigDict(frozen=True)

    id: str
    kind: str
    state: JobState
    progress: float = 0.0
    detail: dict[str, Any] = {}
    params: dict[str, Any] = {}
    result: Any = None
    error: JobError | None = None
    cancel_requested: bool = False
    attempts: int = 0
    worker: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.state.terminal


def _now() -> datetime:
    return datetime.now(UTC)


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"job {what} must be JSON-serialisable: {exc}") from exc


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _encode(record: JobRecord) -> dict[str, str]:
    """A record as Redis hash fields (all strings; absent values as empty strings)."""
    return {
        "id": record.id,
        "kind": record.kind,
        "state": record.state.value,
        "progress": repr(float(record.progress)),
        "detail": _dumps(record.detail, "progress detail"),
        "params": _dumps(record.params, "params"),
        "result": "" if record.result is None else _dumps(record.result, "result"),
        "error_type": record.error.type if record.error else "",
        "error_message": record.error.message if record.error else "",
        "cancel_requested": "1" if record.cancel_requested else "0",
        "attempts": str(record.attempts),
        "worker": record.worker or "",
        "created_at": record.created_at.isoformat(),
        "started_at": record.started_at.isoformat() if record.started_at else "",
        "finished_at": record.finished_at.isoformat() if record.finished_at else "",
    }


def _decode(raw: Mapping[str | bytes, str | bytes]) -> JobRecord:
    f = {_text(k): _text(v) for k, v in raw.items()}
    error = JobError(type=f["error_type"], message=f["error_message"]) \
        if f.get("error_type") else None
    return JobRecord(
        id=f["id"], kind=f["kind"], state=JobState(f["state"]),
        progress=float(f.get("progress") or 0.0),
        detail=json.loads(f.get("detail") or "{}"),
        params=json.loads(f.get("params") or "{}"),
        result=json.loads(f["result"]) if f.get("result") else None,
        error=error,
        cancel_requested=f.get("cancel_requested") == "1",
        attempts=int(f.get("attempts") or 0),
        worker=f.get("worker") or None,
        created_at=datetime.fromisoformat(f["created_at"]),
        started_at=datetime.fromisoformat(f["started_at"]) if f.get("started_at") else None,
        finished_at=datetime.fromisoformat(f["finished_at"]) if f.get("finished_at") else None,
    )


def _check_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise NotFound(f"job {job_id!r} not found")
    return job_id


class JobStore:
    """Job records as Redis hashes, listed newest first through sorted sets.

    ``retention_s``: finished jobs expire from Redis that long after they end (None: never).
    """

    def __init__(self, client: redis.Redis, *, retention_s: float | None = 30 * 24 * 3600) -> None:
        self._redis = client
        self.retention_s = retention_s
        self._renew = client.register_script(_RENEW_LEASE)
        self._release = client.register_script(_RELEASE_LEASE)

    def create(self, kind: str, params: Mapping[str, Any] | None = None) -> str:
        """Record a new queued job of ``kind`` with JSON ``params``; its id (uuid4 hex)."""
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise InvalidName(f"invalid job kind {kind!r}: use [a-z][a-z0-9_.-]{{0,63}}")
        record = JobRecord(id=uuid.uuid4().hex, kind=kind, state=JobState.QUEUED,
                           params=dict(params or {}), created_at=_now())
        fields = _encode(record)
        score = record.created_at.timestamp()
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(keys.job(record.id), mapping=fields)
        pipe.zadd(keys.JOBS, {record.id: score})
        pipe.zadd(keys.jobs_by_kind(kind), {record.id: score})
        pipe.sadd(keys.ACTIVE_JOBS, record.id)
        if self.retention_s is not None:
            # Index entries of jobs older than the retention are pruned here, so the sorted
            # sets stay bounded; list() also drops ids whose hash has expired.
            cutoff = score - self.retention_s
            pipe.zremrangebyscore(keys.JOBS, "-inf", cutoff)
            pipe.zremrangebyscore(keys.jobs_by_kind(kind), "-inf", cutoff)
        self._publish(pipe, "created", record)
        pipe.execute()
        logger.info("job %s (%s) queued", record.id, kind)
        return record.id

    def get(self, job_id: str) -> JobRecord:
        """The job's record; NotFound if there is none (or it has expired)."""
        raw = self._redis.hgetall(keys.job(_check_id(job_id)))
        if not raw:
            raise NotFound(f"job {job_id!r} not found")
        return _decode(raw)

    def list(self, kind: str | None = None, limit: int = 50) -> list[JobRecord]:
        """The newest ``limit`` jobs (of ``kind``, if given), newest first."""
        if not 1 <= limit <= 1000:
            raise ConfigError(f"limit must be in 1..1000, got {limit}")
        index = keys.JOBS if kind is None else keys.jobs_by_kind(kind)
        records: list[JobRecord] = []
        expired: list[str] = []
        start = 0
        while len(records) < limit:  # more pages only if expired ids were in the way
            ids = [_text(i) for i in self._redis.zrevrange(index, start, start + limit - 1)]
            if not ids:
                break
            start += len(ids)
            pipe = self._redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(keys.job(job_id))
            for job_id, raw in zip(ids, pipe.execute()):
                if raw:
                    records.append(_decode(raw))
                else:
                    expired.append(job_id)
        if expired:
            self._redis.zrem(index, *expired)
        return records[:limit]

    def mark_running(self, job_id: str, *, lease_s: float | None = None,
                     token: str | None = None, worker: str | None = None) -> JobRecord:
        """A worker starts (or, after a redelivery, restarts) the job.

        Raises InvalidTransition if the job is finished - e.g. cancelled while it waited in the
        queue: the worker should then skip it - or if it is running under a live lease (another
        worker holds it: this delivery is a duplicate). With ``lease_s`` the caller takes the
        job's lease under ``token`` in the same transaction and must renew it
        (:meth:`renew_lease`) more often than every ``lease_s`` seconds. ``worker`` names the
        worker that starts it (recorded on the job).
        """
        if (lease_s is None) != (token is None):
            raise ConfigError("mark_running needs both lease_s and token, or neither")
        lease_key = keys.job_lease(_check_id(job_id))

        def check(pipe: redis.client.Pipeline, job: JobRecord) -> None:
            if job.state is JobState.RUNNING and pipe.exists(lease_key):
                raise InvalidTransition(
                    f"job {job_id} is running under a live lease (another worker has it); "
                    "this delivery is a duplicate")

        def take(pipe: redis.client.Pipeline) -> None:
            if lease_s is not None:
                pipe.set(lease_key, str(token), px=max(int(lease_s * 1000), 1))

        def change(job: JobRecord) -> dict[str, Any]:
            return {"state": JobState.RUNNING, "attempts": job.attempts + 1,
                    "started_at": _now(), "worker": worker}
        return self._change(job_id, _ACTIVE, change, "running", watch=(lease_key,),
                            check=check, extra=take)

    def renew_lease(self, job_id: str, token: str, lease_s: float,
                    attempt: int | None = None) -> bool:
        """Extend the job's lease by ``lease_s`` if ``token`` still holds it; False if the lease
        was lost (taken by another, or expired). With ``attempt`` (the holder's attempt
        number) an expired lease is taken back if the job is still running that attempt."""
        key = _check_id(job_id)
        return bool(self._renew(keys=[keys.job_lease(key), keys.job(key)],
                                args=[token, max(int(lease_s * 1000), 1),
                                      "" if attempt is None else str(attempt)]))

    def release_lease(self, job_id: str, token: str) -> None:
        """Drop the lease if ``token`` holds it (a job handed back to the queue)."""
        self._release(keys=[keys.job_lease(_check_id(job_id))], args=[token])

    def has_lease(self, job_id: str) -> bool:
        """Whether some worker holds the job's lease now."""
        return bool(self._redis.exists(keys.job_lease(_check_id(job_id))))

    def active(self) -> list[JobRecord]:
        """Every queued or running job (ids whose record expired are dropped from the set)."""
        ids = sorted(_text(i) for i in self._redis.smembers(keys.ACTIVE_JOBS))
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        records, gone = [], []
        for job_id, raw in zip(ids, pipe.execute()):
            record = _decode(raw) if raw else None
            if record is None or record.finished:
                gone.append(job_id)
            else:
                records.append(record)
        if gone:
            self._redis.srem(keys.ACTIVE_JOBS, *gone)
        return records

    def note_requeued(self, job_id: str, reason: str) -> JobRecord:
        """Record on a running job that lost its lease that it goes back to the queue
        (progress 0). InvalidTransition if a worker holds its lease again meanwhile."""
        lease_key = keys.job_lease(_check_id(job_id))

        def check(pipe: redis.client.Pipeline, job: JobRecord) -> None:
            if pipe.exists(lease_key):
                raise InvalidTransition(f"job {job_id} was taken up again by a worker")
        return self._change(job_id, {JobState.RUNNING}, lambda _: {
            "progress": 0.0, "detail": {"phase": "requeued", "reason": reason}}, "progress",
            watch=(lease_key,), check=check)

    def update_progress(self, job_id: str, progress: float,
                        detail: Mapping[str, Any] | None = None) -> JobRecord:
        """Record progress in [0, 1] (+ small JSON ``detail``) of a running job and publish it.

        Returns the updated record, whose ``cancel_requested`` the worker can check for free.
        """
        progress = float(progress)
        if not 0.0 <= progress <= 1.0:
            raise ConfigError(f"progress must be in [0, 1], got {progress}")
        fields: dict[str, Any] = {"progress": progress}
        if detail is not None:
            fields["detail"] = dict(detail)
        return self._change(job_id, {JobState.RUNNING}, lambda _: fields, "progress")

    def succeed(self, job_id: str, result: Any = None) -> JobRecord:
        """The running job finished; ``result`` is small JSON (ids, metrics), not tensors."""
        _dumps(result, "result")
        return self._change(job_id, {JobState.RUNNING}, lambda _: {
            "state": JobState.SUCCEEDED, "progress": 1.0, "result": result,
            "finished_at": _now()}, "succeeded")

    def fail(self, job_id: str, error_type: str, message: str) -> JobRecord:
        """The job failed (a queued one too, e.g. if it could not be enqueued)."""
        return self._change(job_id, _ACTIVE, lambda _: {
            "state": JobState.FAILED, "error": JobError(type=error_type, message=message),
            "finished_at": _now()}, "failed")

    def mark_cancelled(self, job_id: str) -> JobRecord:
        """The worker stopped a running job on request (or anyone cancels a queued one)."""
        return self._change(job_id, _ACTIVE, lambda _: {
            "state": JobState.CANCELLED, "cancel_requested": True, "finished_at": _now()},
            "cancelled")

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel: a queued job becomes cancelled now; a running one gets the cancel flag
        (the worker stops at its next check). Conflict if the job has already finished."""
        def change(job: JobRecord) -> dict[str, Any]:
            if job.state is JobState.QUEUED:
                return {"state": JobState.CANCELLED, "cancel_requested": True,
                        "finished_at": _now()}
            return {"cancel_requested": True}
        try:
            return self._change(job_id, _ACTIVE, change, "cancel_requested")
        except InvalidTransition as exc:
            raise Conflict(f"job {job_id} has already finished; nothing to cancel") from exc

    def cancel_requested(self, job_id: str) -> bool:
        """Whether someone asked to cancel the job (the worker's cooperative check)."""
        flag = self._redis.hget(keys.job(_check_id(job_id)), "cancel_requested")
        if flag is None:
            raise NotFound(f"job {job_id!r} not found")
        return _text(flag) == "1"

    # -- internals -----------------------------------------------------------------------------

    def _change(self, job_id: str, allowed: frozenset[JobState] | set[JobState],
                change: Callable[[JobRecord], dict[str, Any]], event: str, *,
                watch: tuple[str, ...] = (),
                check: Callable[[redis.client.Pipeline, JobRecord], None] | None = None,
                extra: Callable[[redis.client.Pipeline], None] | None = None) -> JobRecord:
        """Apply ``change`` to the record atomically if its state is in ``allowed``.

        ``watch``: more keys the transaction depends on; ``check(pipe, current)`` may read them
        and raise; ``extra(pipe)`` queues more commands into the same MULTI."""
        key = keys.job(_check_id(job_id))
        out: list[JobRecord] = []

        def transaction(pipe: redis.client.Pipeline) -> None:
            out.clear()
            raw = {_text(k): _text(v) for k, v in pipe.hgetall(key).items()}
            if not raw:
                raise NotFound(f"job {job_id!r} not found")
            current = _decode(raw)
            if current.state not in allowed:
                raise InvalidTransition(
                    f"job {job_id} is {current.state.value}; cannot go {event} "
                    f"(allowed from: {', '.join(sorted(s.value for s in allowed))})")
            if check is not None:
                check(pipe, current)
            updated = current.model_copy(update=change(current))
            fields = {k: v for k, v in _encode(updated).items() if raw.get(k) != v}
            pipe.multi()
            if fields:
                pipe.hset(key, mapping=fields)
            if extra is not None:
                extra(pipe)
            if updated.state.terminal:
                pipe.srem(keys.ACTIVE_JOBS, job_id)
                pipe.delete(keys.job_lease(job_id))
                if self.retention_s is not None:
                    pipe.expire(key, int(self.retention_s))
            self._publish(pipe, event, updated)
            out.append(updated)

        self._redis.transaction(transaction, key, *watch)
        if event != "progress":
            logger.info("job %s: %s", job_id, event)
        return out[0]

    @staticmethod
    def _publish(pipe: redis.client.Pipeline, event: str, record: JobRecord) -> None:
        message = json.dumps({"event": event, "job": record.model_dump(mode="json")},
                             separators=(",", ":"))
        pipe.publish(keys.job_channel(record.id), message)
        pipe.publish(keys.JOB_EVENTS_CHANNEL, message)


def wait_for(store: JobStore, job_id: str, timeout_s: float, poll_s: float = 0.1) -> JobRecord:
    """Poll until the job finishes (tests and CLI helpers); TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        record = store.get(job_id)
        if record.finished:
            return record
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {record.state.value} after {timeout_s} s")
        time.sleep(poll_s)
