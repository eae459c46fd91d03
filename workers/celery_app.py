"""The Celery application: Redis broker and result backend, task names, queues, job policy.

Run a worker (one process per GPU; the solo pool runs tasks in the worker process itself, so
CUDA is only ever initialised there and never before a fork)::

    celery -A workers.celery_app worker --pool solo --concurrency 1 -Q regcl.gpu,regcl.merge

with the deployment's ``REGCL_*`` variables in the environment (``REGCL_REDIS_URL``,
``REGCL_ARTIFACT_URL``, ``REGCL_MODEL``, ...). ``app`` is built from them on first access, so
importing this module reads nothing (the API imports :func:`make_celery` from here).

Job and retry policy
    - Job state lives in :class:`~infra.jobs.JobStore`, not in Celery: a task never raises to
      Celery and never retries itself. Results go to the job record (``task_ignore_result``).
    - Bad input (``ConfigError``, ``DataError``, ``AdapterError``, ``StatsError``,
      ``MergeError``, ``NotFound``, ...) fails the job at once with the error's type and message;
      it would fail the same way again, so it is never retried. Unexpected exceptions fail the
      job too (type and message recorded, traceback logged): no automatic retry either.
    - ``task_acks_late`` + ``worker_prefetch_multiplier=1``: a job is acknowledged when it
      *ends*, so a worker that dies mid-job (OOM kill, host loss, cold shutdown) does not lose
      it. The running worker holds the job's lease and renews it (``job_lease_s``); once a
      dead worker's lease lapses, the reaper (:mod:`workers.reaper`, a thread in every worker)
      drops its unacknowledged message and sends the job again, and the next worker starts it
      from scratch - within seconds, not after ``job_visibility_timeout_s`` (the broker's own
      redelivery, still there as a backstop). A warm shutdown requeues its job at once.
      ``task_reject_on_worker_lost`` stays off: a job is not requeued by Celery on top of that.
    - A delivery of a job whose lease is alive (a duplicate message) is skipped, so a job
      never runs on two workers at once.
    - Each start increments the job's ``attempts`` (``JobStore.mark_running``). A job started
      more than :data:`MAX_ATTEMPTS` times is failed with ``WorkerLost`` instead of run, so a job
      that kills its worker (e.g. out of memory) cannot loop through the queue forever.
    - A redelivered job that already finished (its ack was lost) or was cancelled while queued
      is skipped: ``mark_running`` refuses it.
    - A queued job whose message Redis lost (in no queue after ``queued_grace_s``) is sent
      again by the reaper; one whose worker died on every allowed start fails as
      ``WorkerLost``. No job stays queued or running forever.
    - ``job_visibility_timeout_s`` should still exceed the longest job: past it the broker
      redelivers a running job's message (the lease then makes the worker skip it).

Queues: training, evaluation and statistics need the model and (ideally) a GPU and go to
:data:`GPU_QUEUE`; merges are light and go to :data:`MERGE_QUEUE`, so that a deployment can give
them a worker of their own and a merge never waits behind hours of training.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from infra import keys
from infra.settings import Settings

__all__ = [
    "ALL_QUEUES",
    "CONTINUAL",
    "EVALUATE",
    "GPU_QUEUE",
    "MAX_ATTEMPTS",
    "MERGE",
    "MERGE_QUEUE",
    "QUEUE_OF",
    "STATS",
    "TRAIN",
    "make_celery",
]

TRAIN = "regcl.train"
MERGE = "regcl.merge"
EVALUATE = "regcl.evaluate"
STATS = "regcl.stats"
CONTINUAL = "regcl.continual"

GPU_QUEUE = "regcl.gpu"
MERGE_QUEUE = "regcl.merge"
ALL_QUEUES = (GPU_QUEUE, MERGE_QUEUE)
QUEUE_OF = {TRAIN: GPU_QUEUE, EVALUATE: GPU_QUEUE, STATS: GPU_QUEUE, MERGE: MERGE_QUEUE,
            CONTINUAL: GPU_QUEUE}

MAX_ATTEMPTS = 2
"""Starts allowed per job: the first run plus one rerun after a worker died under it."""


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings``: Redis broker + result backend, JSON only, late acks.

    The API uses it to send jobs (:mod:`workers.submit`), the worker to run them; both must be
    built from the same settings. Tasks are registered by importing :mod:`workers.tasks`
    (the worker does that at start: ``include``).
    """
    app = Celery("regcl", broker=settings.redis_url, backend=settings.redis_url,
                 include=["workers.tasks", "workers.continual", "workers.reaper"],
                 set_as_current=False)
    prefix = {"global_keyprefix": keys.CELERY_KEY_PREFIX}
    app.conf.update(
        broker_transport_options={"visibility_timeout": settings.job_visibility_timeout_s,
                                  **prefix},
        result_backend_transport_options=dict(prefix),
        broker_connection_retry_on_startup=True,
        # Never pickle: a message is data, not code.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Results and state are in the JobStore; Celery's result backend is not read.
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        # On a broker connection loss the job's ack cannot be sent: stop it now (it will be
        # redelivered and counted as a new attempt) rather than let it finish twice.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_routes={name: {"queue": queue} for name, queue in QUEUE_OF.items()},
        task_default_queue=GPU_QUEUE,
        worker_hijack_root_logger=True,
        timezone="UTC",
        enable_utc=True,
    )
    return app


def __getattr__(name: str) -> Any:
    """``app`` (what ``celery -A workers.celery_app`` looks for), built from ``Settings()`` on
    first access rather than at import."""
    if name in ("app", "celery"):
        global app
        app = make_celery(Settings())
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
