"""The reaper: jobs whose worker died, or whose queue message Redis lost, are sent again or
failed, so that no job stays ``queued`` or ``running`` forever.

Every worker runs :func:`reap` on a thread every ``settings.reaper_interval_s`` (one worker at a
time, under ``keys.REAPER_LOCK``), and once as soon as it is ready:

- a ``running`` job without a lease (its worker stopped renewing it: SIGKILL, OOM, host loss)
  whose message is not waiting in a queue: the dead worker's unacknowledged copy of the message
  is dropped, and the job is sent again if it has been started fewer than
  :data:`~workers.celery_app.MAX_ATTEMPTS` times, else failed as ``WorkerLost``. (Without this,
  the broker would redeliver it only after ``job_visibility_timeout_s``, hours.)
- a ``queued`` job older than ``settings.queued_grace_s`` whose message is in no queue (Redis
  lost it, e.g. a crash within the last second of its append-only file): it is sent again.
- a job of a kind no worker runs (the API process's Label Studio sync, ``labelstudio-sync``)
  that lost its lease is failed as ``WorkerLost`` (its process stopped; the next sync resumes);
  a queued one is left to the API process that queued it.

Once an hour (one worker of the cluster, under ``keys.STAGING_SWEEP_LOCK``) it also removes the
artifact store's staging leftovers older than a day (:func:`sweep_staging`): files of puts
whose writer was killed or that stopped at a deadline, never visible under any key.

Sending twice is safe: a delivery of a job that is running under a live lease, or that has
finished, is skipped by :meth:`~infra.jobs.JobStore.mark_running`.

The broker's layout read here is kombu's Redis transport with regcl's ``global_keyprefix``:
one list per queue (``regcl:celery:<queue>``, plus ``<queue>\\x06\\x16<priority>`` lists), and the
unacknowledged messages in the hash ``regcl:celery:unacked`` (delivery tag → JSON
``[message, exchange, routing_key]``) indexed by the sorted set ``regcl:celery:unacked_index``.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from infra import keys
from infra.artifacts import ArtifactStore
from infra.errors import InvalidTransition, NotFound
from infra.jobs import JobRecord, JobState, JobStore
from workers.celery_app import ALL_QUEUES, MAX_ATTEMPTS, QUEUE_OF

__all__ = ["ReapReport", "broker_messages", "reap", "send_again"]

logger = logging.getLogger(__name__)

TASK_OF_KIND = {task.removeprefix("regcl."): task for task in QUEUE_OF}
_PRIORITY_SEP = "\x06\x16"
_UNACKED = f"{keys.CELERY_KEY_PREFIX}unacked"
_UNACKED_INDEX = f"{keys.CELERY_KEY_PREFIX}unacked_index"


@dataclass
class ReapReport:
    """What one pass did (job ids)."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)


def _message_id(raw: str | bytes) -> str | None:
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # an unacked entry: [message, exchange, routing_key]
            message = message[0]
        return str(message["headers"]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def broker_messages(client: redis.Redis) -> tuple[set[str], dict[str, list[str]]]:
    """Ids of the jobs whose message waits in a queue, and job id → delivery tags of the
    messages that workers took but have not acknowledged."""
    waiting: set[str] = set()
    for queue in ALL_QUEUES:
        base = f"{keys.CELERY_KEY_PREFIX}{queue}"
        for key in [base, *client.scan_iter(match=f"{base}{_PRIORITY_SEP}*", count=1000)]:
            waiting.update(i for i in map(_message_id, client.lrange(key, 0, -1)) if i)
    unacked: dict[str, list[str]] = {}
    for tag, raw in client.hgetall(_UNACKED).items():
        job_id = _message_id(raw)
        if job_id:
            unacked.setdefault(job_id, []).append(tag.decode() if isinstance(tag, bytes) else tag)
    return waiting, unacked


def send_again(celery: Celery, record: JobRecord) -> None:
    """Send job ``record``'s task again, with the arguments it was submitted with."""
    task = TASK_OF_KIND[record.kind]
    celery.send_task(task, kwargs={"job_id": record.id, **record.params}, task_id=record.id,
                     queue=QUEUE_OF[task])


def reap(jobs: JobStore, client: redis.Redis, celery: Celery, *, lease_s: float,
         queued_grace_s: float) -> ReapReport:
    """One pass over the active jobs (see the module doc)."""
    report = ReapReport()
    active = jobs.active()
    if not active:
        return report
    now = datetime.now(UTC).timestamp()
    waiting, unacked = broker_messages(client)
    for record in active:
        if record.id in waiting:
            continue  # its message is in a queue: a worker will take it
        try:
            if record.state is JobState.RUNNING:
                if record.started_at is None or now - record.started_at.timestamp() < lease_s \
                        or jobs.has_lease(record.id):
                    continue
                if record.kind not in TASK_OF_KIND:  # run by an API process, which stopped
                    jobs.fail(record.id, "WorkerLost", f"the process that ran it stopped (no "
                              f"heartbeat for {lease_s:g} s); start it again to resume")
                    report.failed.append(record.id)
                    continue
                _drop_unacked(client, unacked.get(record.id, []))
                if record.attempts >= MAX_ATTEMPTS:
                    jobs.fail(record.id, "WorkerLost",
                              f"its worker was lost (no heartbeat for {lease_s:g} s) on each of "
                              f"its {record.attempts} starts; it is not started again")
                    report.failed.append(record.id)
                else:
                    jobs.note_requeued(record.id, "its worker was lost (no heartbeat)")
                    send_again(celery, record)
                    report.requeued.append(record.id)
            elif record.state is JobState.QUEUED and record.kind in TASK_OF_KIND \
                    and now - record.created_at.timestamp() >= queued_grace_s:
                _drop_unacked(client, unacked.get(record.id, []))
                send_again(celery, record)
                report.resent.append(record.id)
        except (InvalidTransition, NotFound) as exc:
            logger.info("reaper: job %s changed meanwhile (%s); left alone", record.id, exc)
    if report.requeued or report.failed or report.resent:
        logger.warning("reaper: requeued %s, failed %s, resent (message lost) %s",
                       report.requeued, report.failed, report.resent)
    return report


def _drop_unacked(client: redis.Redis, tags: list[str]) -> None:
    """Remove a dead worker's unacknowledged copies (else the broker redelivers them later)."""
    if tags:
        pipe = client.pipeline(transaction=True)
        pipe.zrem(_UNACKED_INDEX, *tags)
        pipe.hdel(_UNACKED, *tags)
        pipe.execute()


STAGING_SWEEP_INTERVAL_S = 3600.0
STAGING_MAX_AGE_S = 24 * 3600.0


def sweep_staging(store: ArtifactStore, client: redis.Redis, *,
                  interval_s: float = STAGING_SWEEP_INTERVAL_S,
                  max_age_s: float = STAGING_MAX_AGE_S) -> int | None:
    """Remove staging leftovers older than ``max_age_s`` if no worker did it within the last
    ``interval_s``; how many entries were removed (None: not this worker's turn)."""
    if not client.set(keys.STAGING_SWEEP_LOCK, "1", nx=True,
                      px=max(int(interval_s * 1000), 1)):
        return None
    removed = store.cleanup_temp(older_than_s=max_age_s)
    if removed:
        logger.info("reaper: removed %d staging leftover(s) older than %.0f h from the "
                    "artifact store", removed, max_age_s / 3600)
    return removed


# -- the reaper thread of a worker -------------------------------------------------------------


class _ReaperThread:
    def __init__(self, celery: Celery) -> None:
        self.celery = celery
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="regcl-reaper", daemon=True)

    def run(self) -> None:
        from workers.runtime import get_runtime

        rt = get_runtime()
        interval = rt.settings.reaper_interval_s
        # Its own store, tried once: an S3 outage must not hold up the lease checks.
        store = ArtifactStore(rt.settings.artifact_url)
        while True:
            try:
                # One reaper per round across the cluster; the lock just expires.
                if rt.redis.set(keys.REAPER_LOCK, "1", nx=True,
                                px=max(int(interval * 900), 1)):
                    reap(rt.jobs, rt.redis, self.celery, lease_s=rt.settings.job_lease_s,
                         queued_grace_s=rt.settings.queued_grace_s)
            except (redis.exceptions.RedisError, OSError) as exc:
                logger.warning("reaper: Redis unavailable (%s); next round later", exc)
            except Exception:
                logger.exception("reaper pass failed")
            try:
                sweep_staging(store, rt.redis)
            except Exception as exc:  # the store or Redis away: the next turn, an hour on
                logger.warning("reaper: staging sweep failed (%s)", exc)
            if self.stop.wait(interval):
                return


_thread: _ReaperThread | None = None


@worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    global _thread
    app = getattr(sender, "app", None)
    if app is None or _thread is not None:
        return
    _thread = _ReaperThread(app)
    _thread.thread.start()
    logger.info("reaper started")


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _thread is not None:
        _thread.stop.set()
