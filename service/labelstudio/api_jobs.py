"""Jobs that run on threads of the API process (the sync, the pre-encode).

They need what only the API process has (the Label Studio connection, the engine), so no
Celery worker runs them; they are still ordinary job records (``/v1/jobs/{id}``, events,
cancel). Each holds a lease that a heartbeat renews while it runs: a job whose API process
stopped is found by the next start (no lease: ``WorkerLost``), as is one queued by a process
that stopped before it began (queued longer than ``queued_grace_s``, not this process's).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from infra.errors import InvalidTransition, NotFound
from infra.heartbeat import Heartbeat
from infra.jobs import JobRecord, JobState, JobStore
from infra.settings import Settings
from regcl.errors import CancelledError, RegclError
from service.labelstudio.errors import LabelStudioUnreachableError

__all__ = ["MAX_FAILURES_SHOWN", "ApiThreadJobs", "count_failure"]

logger = logging.getLogger(__name__)

MAX_FAILURES_SHOWN = 20
"""Failed tasks a job's result names (it counts them all)."""


def count_failure(counts: dict[str, int], failures: list[dict[str, Any]], exc: Exception,
                  **where: Any) -> None:
    """One task (``where``: its ids) that failed with a typed error: counted in
    ``counts["failed"]``, and named in ``failures`` while it holds fewer than
    :data:`MAX_FAILURES_SHOWN`."""
    counts["failed"] += 1
    if len(failures) < MAX_FAILURES_SHOWN:
        failures.append({**where, "code": getattr(exc, "code", "invalid-data"),
                         "detail": str(exc)[:500]})


class ApiThreadJobs:
    """Runs one kind of job on ``threads`` threads of this process.

    Subclasses name the kind (``what``: "sync", "pre-encode") and say what a lost or never
    started job means for the user (``lost``, ``never_started``, ``after_failure``: appended to
    the failure messages, e.g. "the next sync resumes").
    """

    what = "job"
    lost = "the API process that ran this job stopped"
    never_started = "never started (its API process stopped)"
    after_failure = ""

    def __init__(self, settings: Settings, jobs: JobStore, client: redis.Redis, threads: int,
                 thread_name: str) -> None:
        self.settings = settings
        self.jobs = jobs
        self.redis = client
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=thread_name)
        self._stop = threading.Event()
        self._start_lock = threading.Lock()
        self._mine: set[str] = set()  # jobs submitted to this process's pool

    def close(self) -> None:
        """Stop running jobs at their next step (they fail) and wait for them."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _active(self, key: str) -> JobRecord | None:
        """The job named by ``key``'s ``job`` field if it is still active; a lost or never
        started one is failed (``WorkerLost``) and None returned."""
        raw = self.redis.hget(key, "job")
        if raw is None:
            return None
        try:
            record = self.jobs.get(raw.decode() if isinstance(raw, bytes) else raw)
        except NotFound:
            return None
        if record.finished:
            return None
        if record.state is JobState.RUNNING and not self.jobs.has_lease(record.id):
            with contextlib.suppress(InvalidTransition, NotFound):  # finished meanwhile
                self.jobs.fail(record.id, "WorkerLost", self.lost)
            return None
        if record.state is JobState.QUEUED and record.id not in self._mine and \
                time.time() - record.created_at.timestamp() > self.settings.queued_grace_s:
            with contextlib.suppress(InvalidTransition, NotFound):
                self.jobs.fail(record.id, "WorkerLost", self.never_started)
            return None
        return record

    def _submit(self, job_id: str, project_id: int, work: Callable[[str], dict[str, Any]]
                ) -> None:
        self._mine.add(job_id)
        self._pool.submit(self._run, job_id, project_id, work)

    def _run(self, job_id: str, project_id: int, work: Callable[[str], dict[str, Any]]) -> None:
        """``work(job_id)`` under the job's lease: its result succeeds the job; a cancel, a
        typed error or a bug ends it as such."""
        token, lease_s = uuid.uuid4().hex, self.settings.job_lease_s
        try:
            self.jobs.mark_running(job_id, lease_s=lease_s, token=token, worker="api")
        except (InvalidTransition, NotFound) as exc:  # cancelled while queued
            logger.info("%s job %s not started: %s", self.what, job_id, exc)
            return
        heartbeat = Heartbeat(lambda: self.jobs.renew_lease(job_id, token, lease_s),
                              lease_s / 3, f"job {job_id} lease").start()
        after = f"; {self.after_failure}" if self.after_failure else ""
        try:
            result = work(job_id)
            self.jobs.succeed(job_id, result)
            logger.info("project %d: %s %s done: %s", project_id, self.what, job_id,
                        {k: v for k, v in result.items() if k != "failures"})
        except CancelledError:
            self.jobs.mark_cancelled(job_id)
            logger.info("project %d: %s %s cancelled", project_id, self.what, job_id)
        except RegclError as exc:
            logger.warning("project %d: %s %s stopped (%s: %s)%s", project_id, self.what,
                           job_id, getattr(exc, "code", type(exc).__name__), exc, after)
            self._fail(job_id, type(exc).__name__, str(exc))
        except Exception as exc:
            logger.exception("project %d: %s %s failed", project_id, self.what, job_id)
            self._fail(job_id, type(exc).__name__, f"internal error (see the API's log){after}")
        finally:
            heartbeat.stop()
            self._mine.discard(job_id)
            with contextlib.suppress(redis.exceptions.RedisError):
                self.jobs.release_lease(job_id, token)

    def _fail(self, job_id: str, kind: str, message: str) -> None:
        with contextlib.suppress(InvalidTransition, NotFound, redis.exceptions.RedisError):
            self.jobs.fail(job_id, kind, message)

    def _check_stop(self, job_id: str) -> None:
        """Between two steps of a job: raise if this process stops or a cancel was asked."""
        if self._stop.is_set():
            after = f"; {self.after_failure}" if self.after_failure else ""
            raise LabelStudioUnreachableError(f"the API process is stopping{after}")
        if self.jobs.cancel_requested(job_id):
            raise CancelledError(f"{self.what} {job_id} cancelled")
