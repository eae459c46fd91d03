"""Redis crashes (SIGKILL: no final save, only what the append-only file the embedded default
configures holds) and comes back on the same data directory: job records, the registry, the
merge state and the live pointer are all there; the API and the worker reconnect by
themselves (a request, a job submitted through the API, a merge and a hot-swap all work)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from infra import keys
from infra.jobs import JobState
from regcl.client import ApiConnectionError, ApiError
from tests.reliability.support import Rig, poll, redis_keys, say, segment
from tests.service.api_support import ADMIN_KEY, make_adapter, make_image, png_bytes
from workers.submit import submit_evaluate, submit_merge, submit_train

pytestmark = pytest.mark.slow

EVALUATE = {"max_samples": 4, "batch_size": 4}


def snapshot(rig: Rig) -> dict:
    """Everything that must survive, as plain data."""
    return {
        "jobs": [j.model_dump() for j in rig.jobs.list(limit=100)],
        "adapters": [a.model_dump() for a in rig.registry.list_adapters()],
        "datasets": [d.model_dump() for d in rig.datasets.list_datasets()],
        "versions": [v.model_dump() for v in rig.registry.list_versions()],
        "live": rig.registry.live_version(),
        "counter": rig.client.get(keys.VERSION_COUNTER),
        # Not the broker's keys, nor short-lived locks (the reaper's round lock expires).
        "keys": sorted(k for k in redis_keys(rig.client)
                       if not k.startswith((keys.CELERY_KEY_PREFIX, f"{keys.PREFIX}lock:"))),
    }


def answers(call: Callable[[], object]) -> bool:
    """Whether the API answers ``call`` with a success (an error status is no answer yet)."""
    try:
        call()
    except ApiError:
        return False
    return True


def test_redis_crash_and_restart_loses_nothing_and_everyone_reconnects(rig: Rig) -> None:
    rig.add_dataset("polyp", count=4)
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        rig.registry.add_adapter(name, make_adapter(rig.root / "adapters" / name, seed))
    rig.start_workers("w")
    api = rig.start_api()
    merged = rig.wait(submit_merge(rig.celery, rig.jobs, adapters=["a", "b"], activate=True))
    scored = rig.wait(submit_evaluate(rig.celery, rig.jobs, datasets=["polyp"],
                                      params=EVALUATE))
    assert merged.state is scored.state is JobState.SUCCEEDED
    image = png_bytes(make_image(3))
    with api.api() as client:
        poll(lambda: segment(client, image).adapter_version == "live:1",
             "the API to serve version 1", timeout_s=120)
    before = snapshot(rig)
    assert before["live"] == 1 and len(before["jobs"]) == 2

    time.sleep(1.5)  # appendfsync everysec: what was written a second ago is on disk
    rig.crash_redis()
    with api.api(timeout=15.0) as client:
        try:
            client.list_jobs()
            during: int | str = 200
        except ApiError as exc:
            during = exc.status
        except ApiConnectionError as exc:
            during = type(exc.__cause__ or exc).__name__
    restart_s = rig.start_redis()
    restarted_at = time.monotonic()
    after = snapshot(rig)
    assert after == before

    # The API reconnects: its first request after the restart may still meet a dead
    # connection; it answers again without being restarted.
    with api.api(ADMIN_KEY) as client:
        api_s = poll(lambda: answers(client.live_version), "the API to answer again",
                     timeout_s=120)
        assert segment(client, image).adapter_version == "live:1"
        job_id = client.submit_evaluate(["polyp"], params=EVALUATE).id
    # The worker reconnects and runs it.
    job = rig.wait(job_id, timeout_s=300)
    assert job.state is JobState.SUCCEEDED, job.error
    job_s = time.monotonic() - restarted_at

    # The merge state survived: the next merge folds onto version 1, and the API follows.
    third = rig.wait(submit_merge(rig.celery, rig.jobs, adapters=["c"], activate=True))
    assert third.state is JobState.SUCCEEDED, third.error
    assert third.result["version"] == 2 and third.result["folded"] == ["c"]
    assert rig.registry.get_version(2).lineage["domains"] == ["a", "b", "c"]
    assert rig.registry.get_version(2).lineage["parent"] == 1
    with api.api() as client:
        swap_s = poll(lambda: segment(client, image).adapter_version == "live:2",
                      "the API to serve version 2", timeout_s=120)
    rig.check_store()
    say(f"redis SIGKILLed and restarted ({restart_s:.2f} s to answer PING): "
        f"{len(before['keys'])} regcl keys, {len(before['jobs'])} job records, "
        f"{len(before['adapters'])} adapters, {len(before['versions'])} version(s), live "
        f"{before['live']} all identical after the restart (data lost: 0); API during the "
        f"outage: {during}; API answering {api_s:.2f} s after the restart; a job submitted "
        f"through the API done {job_s:.1f} s after the restart; next merge made v2 from v1's "
        f"state and the API swapped to it {swap_s:.1f} s after activation")


def test_redis_crash_while_a_job_runs_the_job_ends_once(rig: Rig) -> None:
    """Redis dies while a worker trains: the job still ends exactly once (finished by its
    worker, or rerun by policy), with one adapter and no message left."""
    rig.add_dataset("polyp")
    rig.start_workers("w")
    job = submit_train(rig.celery, rig.jobs, dataset="polyp", domain="polyp",
                       params={"epochs": 40, "rank": 4, "batch_size": 4})
    poll(lambda: rig.jobs.get(job.id).detail.get("step", 0) >= 1, "training",
         on_timeout=rig.log_tails)
    time.sleep(1.5)
    rig.crash_redis()
    time.sleep(2.0)
    rig.start_redis()
    restarted_at = time.monotonic()
    done = rig.wait(job)
    assert done.state is JobState.SUCCEEDED, (done.error, rig.log_tails())
    assert done.attempts <= 2
    assert [a.name for a in rig.registry.list_adapters()] == ["polyp"]
    assert rig.registry.get_adapter("polyp").metadata["job_id"] == job.id
    time.sleep(5.0)  # a few reaper rounds: nothing moves any more
    assert rig.jobs.get(job.id).attempts == done.attempts
    assert rig.messages_of(job.id) == 0 and rig.jobs.active() == []
    rig.check_store()
    say(f"redis SIGKILLed for 2 s while a job trained: job succeeded "
        f"{time.monotonic() - restarted_at - 5:.1f} s after the restart with "
        f"{done.attempts} attempt(s); adapters 1; messages left 0")
