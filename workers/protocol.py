"""The job protocol every task follows, written once (see :mod:`infra.jobs` for the states).

:func:`job_task` turns ``fn(job: JobHandle, **kwargs) -> result`` into a Celery task called
with ``job_id`` + ``kwargs`` that:

1. marks the job running (``attempts`` += 1); a job that is already finished or was cancelled
   while queued is skipped, and one started more than
   :data:`~workers.celery_app.MAX_ATTEMPTS` times fails with ``WorkerLost`` (its worker died
   under it each time; see the policy in :mod:`workers.celery_app`);
2. runs ``fn``, which reports progress through :meth:`JobHandle.progress` (throttled) and polls
   :meth:`JobHandle.should_stop` for a cancel request;
3. records the outcome: ``succeeded`` with ``fn``'s JSON result; ``cancelled`` on
   :class:`~regcl.errors.CancelledError`; ``failed`` with the error's type and message on any
   other exception (regcl's own errors are bad input and logged without a traceback; a write
   refused for want of space, ``ENOSPC``, is recorded as ``InsufficientStorage`` whatever
   layer met it; anything else is logged with a traceback). The task never raises to Celery,
   so Celery never retries it.

While the job runs, its worker holds the job's lease (``JobStore.mark_running(lease_s=...)``)
and renews it from a heartbeat thread (``settings.job_lease_s``); if the worker dies, the lease
lapses and :mod:`workers.reaper` requeues the job (or fails it once it has used
:data:`~workers.celery_app.MAX_ATTEMPTS`). A second delivery of a job whose lease is alive is a
duplicate and is skipped.

Fault injection (tests only): ``REGCL_FAULT_PAUSE=<phase>:<seconds>`` in a worker's environment
makes :meth:`JobHandle.phase` sleep that long right after reporting ``<phase>``, so a test can
kill the worker at a known point of a job (e.g. ``store:30``: a merge about to store its
version, merge lock held).

Every phase's time and peak memory are logged when it ends (:mod:`workers.resources`).

One exception: when the worker is asked to shut down (SIGTERM: a warm shutdown, which would
otherwise wait for a job that may take hours), :meth:`JobHandle.should_stop` says stop too; the
job then stays ``running`` and its message is put back in the queue at once (Celery ``Reject``
with requeue), so the next worker starts it again (as a new attempt).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis
from celery import current_task, shared_task
from celery.exceptions import Reject

from infra.errors import InsufficientStorage, InvalidTransition, NotFound, is_out_of_space
from infra.heartbeat import Heartbeat
from infra.jobs import JobRecord, JobStore
from regcl.errors import CancelledError, RegclError
from workers.celery_app import MAX_ATTEMPTS
from workers.resources import PhaseMeter
from workers.runtime import get_runtime

__all__ = ["JobHandle", "job_task", "run_job"]

logger = logging.getLogger(__name__)

FAULT_PAUSE_ENV = "REGCL_FAULT_PAUSE"
_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
FINISH_RETRY_S = 120.0
"""How long a job that ended keeps trying to record its end while Redis is unreachable."""

F = TypeVar("F", bound=Callable[..., Any])


class JobHandle:
    """A running job as its task sees it: progress reports and the cancel flag.

    ``min_interval_s``: progress is written to Redis at most this often (unless forced);
    ``cancel_poll_s``: :meth:`should_stop` reads the cancel flag at most this often.
    """

    def __init__(self, jobs: JobStore, record: JobRecord, *, min_interval_s: float = 1.0,
                 cancel_poll_s: float = 0.5,
                 lease_lost: Callable[[], bool] = lambda: False) -> None:
        self.jobs = jobs
        self.record = record
        self.id = record.id
        self.min_interval_s = min_interval_s
        self.cancel_poll_s = cancel_poll_s
        self._lease_lost = lease_lost
        self._cancelled = record.cancel_requested
        self.interrupted = False  # set when should_stop said stop because the worker stops
        self.superseded = False  # set when should_stop said stop because the lease was lost
        self._last_report = float("-inf")
        self._last_poll = time.monotonic()
        self.meter = PhaseMeter(record.id)  # time and peak memory per phase, in the log

    def progress(self, fraction: float, detail: Mapping[str, Any] | None = None, *,
                 force: bool = False) -> None:
        """Record progress ``fraction`` in [0, 1] with small JSON ``detail``; skipped if the
        last report is younger than ``min_interval_s`` unless ``force``."""
        now = time.monotonic()
        if not force and now - self._last_report < self.min_interval_s:
            return
        self._last_report = now
        try:
            record = self.jobs.update_progress(self.id, min(max(float(fraction), 0.0), 1.0),
                                               detail)
        except _REDIS_DOWN as exc:  # progress is best effort: a Redis restart must not fail
            logger.warning("job %s: progress not recorded (%s)", self.id, exc)  # the job
            return
        self._cancelled = self._cancelled or record.cancel_requested
        self._last_poll = now

    def phase(self, fraction: float, name: str, **detail: Any) -> None:
        """Report the start of a phase (``prepare``, ``train``, ``stats``...) and stop here if
        the job was cancelled."""
        self.meter.start(name)
        self.progress(fraction, {"phase": name, **detail}, force=True)
        _fault_pause(name)
        self.check_cancelled()

    def should_stop(self) -> bool:
        """Whether to stop now: a cancel was requested (the flag is read at most every
        ``cancel_poll_s``) or the worker is shutting down (then :attr:`interrupted` is set)."""
        now = time.monotonic()
        if not self._cancelled and now - self._last_poll >= self.cancel_poll_s:
            self._last_poll = now
            try:
                self._cancelled = self.jobs.cancel_requested(self.id)
            except _REDIS_DOWN as exc:  # ask again at the next poll
                logger.warning("job %s: cancel flag not read (%s)", self.id, exc)
        if not self._cancelled and _worker_shutting_down():
            self.interrupted = True
        if self._lease_lost():
            self.superseded = True
        return self._cancelled or self.interrupted or self.superseded

    def check_cancelled(self) -> None:
        """Raise CancelledError if a cancel was requested (or the job must stop otherwise)."""
        if self.should_stop():
            raise CancelledError(f"job {self.id} cancelled on request")

    def step_reporter(self, start: float, end: float, phase: str
                      ) -> Callable[[Mapping[str, Any]], None]:
        """A ``progress`` callback for :func:`regcl.training.adapter.train_adapter`: maps
        ``step / total_steps`` onto [start, end] and reports step, total, epoch and loss."""
        def report(info: Mapping[str, Any]) -> None:
            step, total = int(info["step"]), max(int(info["total_steps"]), 1)
            detail = {"phase": phase, "step": step, "total": total,
                      "epoch": info.get("epoch"), "loss": _rounded(info.get("loss")),
                      "iou": _rounded(info.get("iou"))}
            self.progress(start + (end - start) * step / total, detail, force=step == total)
        return report


def _fault_pause(phase: str) -> None:
    """Sleep if ``REGCL_FAULT_PAUSE`` names this phase (fault-injection tests only)."""
    wanted = os.environ.get(FAULT_PAUSE_ENV, "")
    name, _, seconds = wanted.partition(":")
    if name and name == phase:
        logger.warning("fault injection: pausing %s s after phase %r", seconds, phase)
        time.sleep(float(seconds or 0))


def _worker_shutting_down() -> bool:
    """True once the Celery worker running this process was told to stop (warm or cold)."""
    from celery.worker import state

    return any(flag is not None and flag is not False
               for flag in (state.should_stop, state.should_terminate))


def _rounded(value: Any) -> Any:
    return round(float(value), 5) if isinstance(value, int | float) else None


def run_job(job_id: str, body: Callable[[JobHandle], Any], worker: str | None = None) -> None:
    """Run ``body`` as job ``job_id`` under the protocol above (see the module doc);
    ``worker``: this worker's name, recorded on the job."""
    runtime = get_runtime()
    jobs, lease_s = runtime.jobs, runtime.settings.job_lease_s
    token = uuid.uuid4().hex
    try:
        record = jobs.mark_running(job_id, lease_s=lease_s, token=token, worker=worker)
    except InvalidTransition as exc:
        logger.info("skipping job %s: %s", job_id, exc)
        return
    except NotFound:
        logger.warning("job %s has no record (expired or never created); dropping it", job_id)
        return
    if record.attempts > MAX_ATTEMPTS:
        _finish(jobs.fail, job_id, "WorkerLost",
                f"the job was started {record.attempts - 1} times and its worker was lost "
                "each time (killed, out of memory, or shut down); it is not started again")
        return
    if record.cancel_requested:  # requested while an earlier attempt ran, before it died
        _finish(jobs.mark_cancelled, job_id)
        return
    logger.info("job %s (%s) started, attempt %d", job_id, record.kind, record.attempts)
    heartbeat = Heartbeat(lambda: jobs.renew_lease(job_id, token, lease_s, record.attempts),
                          lease_s / 3.0, f"the lease of job {job_id}").start()
    try:
        _run_body(jobs, JobHandle(jobs, record, lease_lost=heartbeat.lost.is_set), body, token)
    finally:
        heartbeat.stop()


def _run_body(jobs: JobStore, job: JobHandle, body: Callable[[JobHandle], Any],
              token: str) -> None:
    job_id = job.id
    try:
        try:
            result = body(job)
        finally:
            job.meter.finish()
    except CancelledError:
        if job.superseded:
            logger.warning("job %s lost its lease (a later attempt owns it); stopped without "
                           "recording anything", job_id)
            return
        if job.interrupted:
            logger.warning("job %s interrupted by the worker's shutdown; requeued", job_id)
            try:
                jobs.update_progress(job_id, 0.0, {"phase": "requeued",
                                                   "reason": "its worker shut down"})
                jobs.release_lease(job_id, token)  # else the requeued message is refused
            except _REDIS_DOWN:  # the lease then lapses; the reaper leaves a queued job be
                logger.warning("job %s: could not record the requeue", job_id)
            raise Reject("worker shutting down", requeue=True) from None
        logger.info("job %s cancelled", job_id)
        _finish(jobs.mark_cancelled, job_id)
    except RegclError as exc:  # bad input or state: it would fail the same way again
        logger.warning("job %s failed: %s: %s", job_id, type(exc).__name__, exc)
        _finish(jobs.fail, job_id, type(exc).__name__, str(exc))
    except Exception as exc:
        if is_out_of_space(exc):  # a full disk, not a bug: named as the API names it
            logger.error("job %s failed: no space left (%s)", job_id, exc)
            _finish(jobs.fail, job_id, InsufficientStorage.__name__, str(exc))
            return
        logger.exception("job %s failed unexpectedly", job_id)
        _finish(jobs.fail, job_id, type(exc).__name__, str(exc) or repr(exc))
    else:
        _finish(jobs.succeed, job_id, result)
        logger.info("job %s succeeded", job_id)


def _finish(change: Callable[..., JobRecord], job_id: str, *args: Any) -> None:
    """Write the job's terminal state, retrying while Redis is unreachable (for up to
    :data:`FINISH_RETRY_S`); log (do not raise) if that is no longer possible."""
    deadline, delay = time.monotonic() + FINISH_RETRY_S, 0.25
    while True:
        try:
            change(job_id, *args)
            return
        except (InvalidTransition, NotFound) as exc:
            logger.warning("job %s: could not record its end: %s", job_id, exc)
            return
        except _REDIS_DOWN as exc:
            if time.monotonic() > deadline:
                raise
            logger.warning("job %s: Redis unreachable while recording its end (%s); "
                           "retrying", job_id, exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def job_task(name: str) -> Callable[[F], Any]:
    """Decorator: ``fn(job, **kwargs) -> JSON result`` becomes Celery task ``name``, called
    with ``job_id=...`` and ``kwargs``, run under :func:`run_job`."""
    def decorate(fn: F) -> Any:
        def task(job_id: str, **kwargs: Any) -> None:
            run_job(job_id, lambda job: fn(job, **kwargs), worker=current_task.request.hostname)

        task.__name__, task.__qualname__ = fn.__name__, fn.__qualname__
        task.__module__, task.__doc__ = fn.__module__, fn.__doc__
        return shared_task(name=name, ignore_result=True)(task)
    return decorate
