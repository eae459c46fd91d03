"""JobStore against a real Redis: lifecycle, invalid transitions, cancellation, events."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import redis

from infra import keys
from infra.errors import ConfigError, Conflict, InvalidName, InvalidTransition, NotFound
from infra.jobs import JobState, JobStore


@pytest.fixture
def jobs(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client)


def test_lifecycle_success(jobs: JobStore) -> None:
    job_id = jobs.create("train", {"domain": "polyp", "epochs": 2})
    assert len(job_id) == 32
    job = jobs.get(job_id)
    assert (job.kind, job.state, job.progress, job.attempts) == ("train", JobState.QUEUED, 0, 0)
    assert job.params == {"domain": "polyp", "epochs": 2}
    assert job.started_at is None and job.finished_at is None and not job.finished

    assert job.worker is None
    running = jobs.mark_running(job_id, worker="gpu-1@host-a")
    assert running.state is JobState.RUNNING and running.attempts == 1
    assert running.started_at is not None and running.started_at >= job.created_at
    assert running.worker == jobs.get(job_id).worker == "gpu-1@host-a"

    jobs.update_progress(job_id, 0.5, {"step": 10, "total": 20, "loss": 0.25})
    job = jobs.get(job_id)
    assert job.progress == 0.5 and job.detail == {"step": 10, "total": 20, "loss": 0.25}

    done = jobs.succeed(job_id, {"adapter": "polyp", "dice": 0.81})
    assert done == jobs.get(job_id)
    assert done.state is JobState.SUCCEEDED and done.finished and done.progress == 1.0
    assert done.result == {"adapter": "polyp", "dice": 0.81}
    assert done.finished_at is not None and done.finished_at >= done.started_at
    assert done.error is None


def test_failure_records_the_error(jobs: JobStore) -> None:
    job_id = jobs.create("merge")
    jobs.mark_running(job_id)
    failed = jobs.fail(job_id, "MergeError", "mismatched layers")
    assert failed.state is JobState.FAILED
    assert (failed.error.type, failed.error.message) == ("MergeError", "mismatched layers")
    assert jobs.get(job_id).error == failed.error


@pytest.mark.parametrize("finish", ["succeed", "fail", "cancel"])
def test_terminal_states_are_final(jobs: JobStore, finish: str) -> None:
    job_id = jobs.create("train")
    jobs.mark_running(job_id)
    {"succeed": lambda: jobs.succeed(job_id, None),
     "fail": lambda: jobs.fail(job_id, "E", "m"),
     "cancel": lambda: jobs.mark_cancelled(job_id)}[finish]()
    final = jobs.get(job_id)
    for attempt in (lambda: jobs.mark_running(job_id),
                    lambda: jobs.update_progress(job_id, 0.1),
                    lambda: jobs.succeed(job_id, {}),
                    lambda: jobs.fail(job_id, "E", "m"),
                    lambda: jobs.mark_cancelled(job_id)):
        with pytest.raises(InvalidTransition) as info:
            attempt()
        assert isinstance(info.value, Conflict)
    assert jobs.get(job_id) == final


def test_queued_jobs_cannot_report_progress_or_succeed(jobs: JobStore) -> None:
    job_id = jobs.create("train")
    with pytest.raises(InvalidTransition):
        jobs.update_progress(job_id, 0.3)
    with pytest.raises(InvalidTransition):
        jobs.succeed(job_id, {})
    assert jobs.get(job_id).state is JobState.QUEUED


def test_redelivered_job_restarts(jobs: JobStore) -> None:
    job_id = jobs.create("train")
    jobs.mark_running(job_id)
    again = jobs.mark_running(job_id)  # the broker redelivered it after a worker died
    assert again.state is JobState.RUNNING and again.attempts == 2


def test_cancel_a_queued_job(jobs: JobStore) -> None:
    job_id = jobs.create("train")
    cancelled = jobs.request_cancel(job_id)
    assert cancelled.state is JobState.CANCELLED and cancelled.finished_at is not None
    assert jobs.cancel_requested(job_id)
    with pytest.raises(InvalidTransition):
        jobs.mark_running(job_id)  # the worker that picks it up later must skip it


def test_cancel_a_running_job_is_cooperative(jobs: JobStore) -> None:
    job_id = jobs.create("train")
    jobs.mark_running(job_id)
    assert not jobs.cancel_requested(job_id)
    flagged = jobs.request_cancel(job_id)
    assert flagged.state is JobState.RUNNING and flagged.cancel_requested
    assert jobs.cancel_requested(job_id)
    assert jobs.update_progress(job_id, 0.4).cancel_requested  # the worker sees it for free
    assert jobs.mark_cancelled(job_id).state is JobState.CANCELLED


def test_cancel_a_finished_job_conflicts(jobs: JobStore) -> None:
    job_id = jobs.create("train")
    jobs.mark_running(job_id)
    jobs.succeed(job_id, {})
    with pytest.raises(Conflict, match="already finished"):
        jobs.request_cancel(job_id)
    assert jobs.get(job_id).state is JobState.SUCCEEDED


def test_concurrent_finishers_exactly_one_wins(jobs: JobStore) -> None:
    """WATCH/MULTI: of a succeed and a fail racing on one job, one lands and one is refused."""
    for _ in range(10):
        job_id = jobs.create("train")
        jobs.mark_running(job_id)
        barrier, outcomes = threading.Barrier(2), []

        def finish(action: str, job_id: str = job_id, barrier: threading.Barrier = barrier,
                   outcomes: list[str] = outcomes) -> None:
            barrier.wait()
            try:
                if action == "succeed":
                    jobs.succeed(job_id, {"by": "succeed"})
                else:
                    jobs.fail(job_id, "E", "by fail")
                outcomes.append(action)
            except InvalidTransition:
                outcomes.append("refused")

        threads = [threading.Thread(target=finish, args=(a,)) for a in ("succeed", "fail")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) in (["refused", "succeed"], ["fail", "refused"])
        final = jobs.get(job_id)
        winner = next(o for o in outcomes if o != "refused")
        assert final.state is (JobState.SUCCEEDED if winner == "succeed" else JobState.FAILED)
        assert (final.result is None) == (winner == "fail")
        assert (final.error is None) == (winner == "succeed")


def test_list_newest_first_and_by_kind(jobs: JobStore, redis_client: redis.Redis) -> None:
    ids = [jobs.create("train" if i % 2 == 0 else "merge", {"i": i}) for i in range(5)]
    assert [j.id for j in jobs.list()] == ids[::-1]
    assert [j.id for j in jobs.list(kind="merge")] == [ids[3], ids[1]]
    assert [j.id for j in jobs.list(limit=2)] == [ids[4], ids[3]]
    assert jobs.list(kind="evaluate") == []
    # A job whose hash has expired disappears from the listing and from the index.
    redis_client.delete(keys.job(ids[4]))
    assert [j.id for j in jobs.list(limit=1)] == [ids[3]]
    assert redis_client.zscore(keys.JOBS, ids[4]) is None
    with pytest.raises(ConfigError):
        jobs.list(limit=0)


def test_finished_jobs_expire_after_the_retention(redis_client: redis.Redis) -> None:
    jobs = JobStore(redis_client, retention_s=3600)
    job_id = jobs.create("train")
    assert redis_client.ttl(keys.job(job_id)) == -1  # active jobs never expire
    jobs.mark_running(job_id)
    jobs.succeed(job_id, {})
    assert 0 < redis_client.ttl(keys.job(job_id)) <= 3600


def test_bad_input(jobs: JobStore) -> None:
    with pytest.raises(InvalidName):
        jobs.create("Train Job")
    with pytest.raises(ConfigError):
        jobs.create("train", {"x": object()})
    with pytest.raises(ConfigError):
        jobs.create("train", {"x": float("nan")})
    with pytest.raises(NotFound) as info:
        jobs.get("0" * 32)
    assert isinstance(info.value, KeyError)
    with pytest.raises(NotFound):
        jobs.get("../../etc")
    with pytest.raises(NotFound):
        jobs.mark_running("f" * 32)
    job_id = jobs.create("train")
    jobs.mark_running(job_id)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError):
            jobs.update_progress(job_id, bad)


def _collect(pubsub: redis.client.PubSub, count: int, timeout_s: float = 5.0) -> list[dict]:
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(events) < count and time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message is not None:
            events.append(json.loads(message["data"]))
    return events


def test_progress_events_reach_subscribers(jobs: JobStore, redis_client: redis.Redis) -> None:
    job_id = jobs.create("train")
    per_job = redis_client.pubsub()
    per_job.subscribe(keys.job_channel(job_id))
    everything = redis_client.pubsub()
    everything.subscribe(keys.JOB_EVENTS_CHANNEL)
    for p in (per_job, everything):  # consume the subscribe confirmations
        assert p.get_message(timeout=2.0)["type"] == "subscribe"
    other = jobs.create("merge")  # another job's event: global channel only

    jobs.mark_running(job_id)
    jobs.update_progress(job_id, 0.25, {"step": 5, "total": 20, "loss": 0.5})
    jobs.succeed(job_id, {"ok": True})

    events = _collect(per_job, 3)
    assert [e["event"] for e in events] == ["running", "progress", "succeeded"]
    assert all(e["job"]["id"] == job_id for e in events)
    assert events[1]["job"]["progress"] == 0.25
    assert events[1]["job"]["detail"] == {"step": 5, "total": 20, "loss": 0.5}
    assert events[1]["job"]["state"] == "running"
    assert events[2]["job"]["result"] == {"ok": True}

    seen = _collect(everything, 4)
    assert [(e["event"], e["job"]["id"]) for e in seen] == [
        ("created", other), ("running", job_id), ("progress", job_id), ("succeeded", job_id)]
    per_job.close()
    everything.close()


def test_a_lease_fences_duplicate_deliveries_and_lapses_without_renewal(
        redis_client: redis.Redis) -> None:
    jobs = JobStore(redis_client)
    job_id = jobs.create("train")
    assert [r.id for r in jobs.active()] == [job_id]
    first = jobs.mark_running(job_id, lease_s=0.5, token="first")
    assert first.attempts == 1 and jobs.has_lease(job_id)
    with pytest.raises(InvalidTransition):  # a duplicate message while the worker lives
        jobs.mark_running(job_id, lease_s=0.5, token="second")
    assert jobs.renew_lease(job_id, "first", 0.5)
    assert not jobs.renew_lease(job_id, "second", 0.5)  # only the holder renews
    time.sleep(0.8)  # the worker died: nobody renews
    assert not jobs.has_lease(job_id)
    assert not jobs.renew_lease(job_id, "first", 0.5)  # a lapsed lease is not taken back
    assert jobs.note_requeued(job_id, "worker lost").detail["phase"] == "requeued"
    rerun = jobs.mark_running(job_id, lease_s=5, token="second")
    assert rerun.attempts == 2
    with pytest.raises(InvalidTransition):  # the reaper leaves a job with a live lease alone
        jobs.note_requeued(job_id, "worker lost")
    jobs.succeed(job_id, {"ok": True})
    assert not jobs.has_lease(job_id) and jobs.active() == []
    with pytest.raises(ConfigError):
        jobs.mark_running(jobs.create("train"), lease_s=1)


def test_releasing_a_lease_lets_the_requeued_delivery_run(redis_client: redis.Redis) -> None:
    jobs = JobStore(redis_client)
    job_id = jobs.create("train")
    jobs.mark_running(job_id, lease_s=30, token="a")
    jobs.release_lease(job_id, "b")  # not the holder: no effect
    assert jobs.has_lease(job_id)
    jobs.release_lease(job_id, "a")  # a warm shutdown hands the job back
    assert jobs.mark_running(job_id, lease_s=30, token="b").attempts == 2


def test_a_lapsed_lease_is_taken_back_only_by_its_own_attempt(redis_client: redis.Redis) -> None:
    jobs = JobStore(redis_client)
    job_id = jobs.create("train")
    jobs.mark_running(job_id, lease_s=0.3, token="first")
    time.sleep(0.5)  # e.g. Redis was away for longer than the lease
    assert not jobs.renew_lease(job_id, "first", 5, attempt=2)  # not its attempt
    assert jobs.renew_lease(job_id, "first", 5, attempt=1)  # still running attempt 1
    with pytest.raises(InvalidTransition):  # the reaper's copy of the job is a duplicate now
        jobs.mark_running(job_id, lease_s=5, token="second")
    redis_client.delete(keys.job_lease(job_id))
    jobs.mark_running(job_id, lease_s=5, token="second")  # a later attempt started
    redis_client.delete(keys.job_lease(job_id))
    assert not jobs.renew_lease(job_id, "first", 5, attempt=1)
