"""A worker SIGKILLed in the middle of a job: the job is rerun once by policy (or, if its worker
dies again, failed as ``WorkerLost``), nothing half-made is registered, and the queue does not
loop. Real redis-server, real Celery worker processes (see ``support.Rig``).
"""

from __future__ import annotations

import time

import pytest

from infra import keys
from infra.errors import NotFound
from infra.jobs import JobState
from tests.reliability.support import LEASE_S, REAPER_INTERVAL_S, Rig, Worker, poll, say
from tests.service.api_support import make_adapter
from workers.celery_app import MAX_ATTEMPTS
from workers.submit import submit_merge, submit_train

pytestmark = pytest.mark.slow

SHORT = {"epochs": 40, "rank": 4, "batch_size": 4}   # 80 steps: done in seconds
LONG = {"epochs": 1000, "rank": 4, "batch_size": 4}  # never finishes within a test


def runner_of(rig: Rig, job_id: str, attempt: int) -> Worker:
    """The worker whose log says it started attempt ``attempt`` of the job."""
    marker = f"job {job_id} (train) started, attempt {attempt}"
    found: list[Worker] = []

    def started() -> bool:
        found[:] = [w for w in rig.workers if marker in w.log.read_text(errors="replace")]
        return bool(found)
    poll(started, f"a worker to start attempt {attempt}", on_timeout=rig.log_tails)
    return found[0]


def wait_training(rig: Rig, job_id: str, attempt: int) -> None:
    """Until attempt ``attempt`` has reported at least one training step (the middle)."""
    def training() -> bool:
        record = rig.jobs.get(job_id)
        return record.attempts == attempt and record.detail.get("phase") == "train" \
            and record.detail.get("step", 0) >= 1
    poll(training, f"attempt {attempt} to train", on_timeout=rig.log_tails)


def assert_quiet(rig: Rig, job_id: str, attempts: int, state: JobState) -> None:
    """A few reaper rounds later nothing moved: no new attempt, no message left."""
    time.sleep(LEASE_S + 3 * REAPER_INTERVAL_S)
    record = rig.jobs.get(job_id)
    assert (record.state, record.attempts) == (state, attempts)
    assert rig.messages_of(job_id) == 0
    assert rig.jobs.active() == []


def test_a_worker_killed_mid_training_is_rerun_once(rig: Rig) -> None:
    rig.add_dataset("polyp")
    rig.start_workers("a", "b")
    job = submit_train(rig.celery, rig.jobs, dataset="polyp", domain="polyp", params=SHORT)
    wait_training(rig, job.id, 1)
    victim = runner_of(rig, job.id, 1)
    victim.kill()
    killed_at = time.monotonic()
    progress = rig.jobs.get(job.id)
    assert progress.state is JobState.RUNNING and 0 < progress.progress < 1
    assert rig.messages_of(job.id) == 1  # the dead worker's unacknowledged copy
    with pytest.raises(NotFound):
        rig.registry.get_adapter("polyp")

    requeue_s = poll(lambda: rig.jobs.get(job.id).attempts == 2, "the rerun",
                     on_timeout=rig.log_tails)
    done = rig.wait(job)
    total_s = time.monotonic() - killed_at
    assert done.state is JobState.SUCCEEDED, done.error
    assert done.attempts == 2
    adapters = rig.registry.list_adapters()
    assert [a.name for a in adapters] == ["polyp"]
    assert adapters[0].metadata["job_id"] == job.id
    figures = rig.check_store()
    assert_quiet(rig, job.id, 2, JobState.SUCCEEDED)
    say(f"kill mid-training at progress {progress.progress:.2f} "
        f"(step {progress.detail['step']}/{progress.detail['total']}): rerun started "
        f"{requeue_s:.1f} s after the kill (lease {LEASE_S:g} s), succeeded after "
        f"{total_s:.1f} s; attempts {done.attempts}; adapters registered "
        f"{figures['adapters']}; jobs lost 0; messages left 0")


def test_a_job_whose_worker_dies_on_every_attempt_fails_as_worker_lost(rig: Rig) -> None:
    rig.add_dataset("polyp")
    rig.start_workers("a", "b")
    job = submit_train(rig.celery, rig.jobs, dataset="polyp", domain="polyp", params=LONG)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        wait_training(rig, job.id, attempt)
        runner_of(rig, job.id, attempt).kill()
        say(f"attempt {attempt} killed at progress {rig.jobs.get(job.id).progress:.3f}")
    assert all(w.process.poll() is not None for w in rig.workers)
    killed_at = time.monotonic()
    rig.start_workers("c")  # its reaper finds the job without a live lease
    done = rig.wait(job)
    assert done.state is JobState.FAILED and done.error.type == "WorkerLost", done
    assert done.attempts == MAX_ATTEMPTS
    with pytest.raises(NotFound):
        rig.registry.get_adapter("polyp")
    assert rig.registry.list_adapters() == []
    assert f"job {job.id} (train) started" not in rig.workers[-1].log.read_text()
    figures = rig.check_store()
    assert_quiet(rig, job.id, MAX_ATTEMPTS, JobState.FAILED)
    say(f"worker killed on each of {MAX_ATTEMPTS} attempts: failed as WorkerLost "
        f"{time.monotonic() - killed_at:.1f} s after the last kill (incl. starting a worker); "
        f"reason: {done.error.message!r}; adapters registered {figures['adapters']}; "
        "messages left 0")


def test_a_worker_killed_mid_merge_leaves_no_version_and_the_rerun_merges(rig: Rig) -> None:
    for name, seed in (("a", 1), ("b", 2)):
        rig.registry.add_adapter(name, make_adapter(rig.root / "adapters" / name, seed))
    # "store:120": the merge pauses with every adapter folded and the merge lock held, just
    # before it writes the version.
    rig.start_workers("paused", env={"REGCL_FAULT_PAUSE": "store:120"})
    job = submit_merge(rig.celery, rig.jobs, adapters=["a", "b"], activate=True)
    poll(lambda: rig.jobs.get(job.id).detail.get("phase") == "store", "the merge to store",
         on_timeout=rig.log_tails)
    assert rig.client.exists(keys.MERGE_LOCK)
    rig.workers[0].kill()
    killed_at = time.monotonic()
    lapse_s = poll(lambda: not rig.client.exists(keys.MERGE_LOCK),
                   "the dead merger's lock to lapse", timeout_s=60)
    assert rig.registry.list_versions() == [] and rig.registry.live_version() is None

    rig.start_workers("rerun")
    done = rig.wait(job)
    assert done.state is JobState.SUCCEEDED, done.error
    assert done.attempts == 2
    versions = rig.registry.list_versions()
    assert [v.number for v in versions] == [done.result["version"]]
    assert versions[0].lineage["domains"] == ["a", "b"]
    assert versions[0].lineage["job_id"] == job.id
    assert rig.registry.live_version() == versions[0].number
    assert not rig.client.exists(keys.MERGE_LOCK)
    figures = rig.check_store()
    assert_quiet(rig, job.id, 2, JobState.SUCCEEDED)
    say(f"kill mid-merge (lock held, about to store): lock lapsed {lapse_s:.1f} s after the "
        f"kill (lease {LEASE_S:g} s); no version registered meanwhile; rerun (attempt 2) made "
        f"version {versions[0].number} with domains {versions[0].lineage['domains']} "
        f"{time.monotonic() - killed_at:.1f} s after the kill (incl. starting a worker); "
        f"versions {figures['versions']}")
