"""Queue pressure and lost messages, with real worker processes: many jobs submitted at once
are all accounted for (each ends once, none is lost, nothing is registered twice), and a job
whose queue message Redis lost is sent again by the reaper instead of staying queued forever.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from infra import keys
from infra.jobs import JobState
from tests.reliability.support import Rig, poll, say
from tests.service.api_support import make_adapter
from workers.celery_app import GPU_QUEUE
from workers.submit import submit_evaluate, submit_stats

pytestmark = pytest.mark.slow

STATS = {"max_samples": 2, "batch_size": 2}
EVALUATE = {"max_samples": 2, "batch_size": 2}


def test_thirty_jobs_at_once_are_all_accounted_for(rig: Rig) -> None:
    rig.add_dataset("polyp", count=2)
    rig.registry.add_adapter("src", make_adapter(rig.root / "src", seed=1, stats=False))
    rig.start_workers("q1", "q2")

    # 26 stats jobs with distinct outputs, 2 racing for the same output, 2 evaluations.
    calls = [("stats", f"out-{i:02d}") for i in range(26)] + [("stats", "dup")] * 2 + \
        [("evaluate", None)] * 2
    lock = threading.Lock()
    submitted: list[tuple[str, str | None]] = []

    def submit(call: tuple[str, str | None]) -> None:
        kind, output = call
        if kind == "stats":
            job = submit_stats(rig.celery, rig.jobs, adapter="src", dataset="polyp",
                               params={**STATS, "output": output})
        else:
            job = submit_evaluate(rig.celery, rig.jobs, datasets=["polyp"], params=EVALUATE)
        with lock:
            submitted.append((job.id, output))

    start = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(submit, calls))
    assert len({job_id for job_id, _ in submitted}) == len(calls) == 30
    done = {job_id: rig.wait(job_id) for job_id, _ in submitted}
    elapsed = time.monotonic() - start

    states = [r.state for r in done.values()]
    dup_states = sorted(done[j].state.value for j, out in submitted if out == "dup")
    assert dup_states == ["failed", "succeeded"]  # one wins the name, the other is refused
    assert [done[j].error.type for j, out in submitted
            if out == "dup" and done[j].state is JobState.FAILED] == ["Conflict"]
    others = [done[j] for j, out in submitted if out != "dup"]
    assert all(r.state is JobState.SUCCEEDED for r in others), \
        [r.error for r in others if r.error]
    assert all(r.attempts == 1 for r in done.values())
    names = sorted(a.name for a in rig.registry.list_adapters())
    assert names == sorted({"src", "dup", *(f"out-{i:02d}" for i in range(26))})
    for out in names:
        if out != "src":
            made_by = rig.registry.get_adapter(out).metadata["stats_from"]["job_id"]
            assert done[made_by].state is JobState.SUCCEEDED and done[made_by].result[
                "adapter"] == out
    assert rig.jobs.active() == []
    assert all(rig.messages_of(j) == 0 for j in done)
    assert len(rig.jobs.list(limit=100)) == 30
    rig.check_store()
    say(f"30 jobs submitted at once from 10 threads to 2 workers: all ended in "
        f"{elapsed:.1f} s ({states.count(JobState.SUCCEEDED)} succeeded, "
        f"{states.count(JobState.FAILED)} failed: the one of 2 racing for output 'dup' that "
        f"lost, as Conflict); lost 0, run twice 0, adapters registered {len(names) - 1} "
        "(none twice), messages left 0")


def test_a_job_whose_message_redis_lost_is_sent_again(rig: Rig) -> None:
    rig.add_dataset("polyp", count=2)
    job = submit_evaluate(rig.celery, rig.jobs, datasets=["polyp"], params=EVALUATE)
    queue = f"{keys.CELERY_KEY_PREFIX}{GPU_QUEUE}"
    assert rig.client.llen(queue) == 1
    rig.client.delete(queue)  # as if Redis lost the message (crash before its AOF fsync)
    assert rig.messages_of(job.id) == 0
    lost_at = time.monotonic()
    rig.start_workers("w")
    poll(lambda: rig.jobs.get(job.id).state is not JobState.QUEUED,
         "the lost job to be sent again", timeout_s=120, interval_s=0.02)
    resent_s = time.monotonic() - lost_at
    done = rig.wait(job)
    assert done.state is JobState.SUCCEEDED and done.attempts == 1, done
    assert rig.messages_of(job.id) == 0 and rig.jobs.active() == []
    log = rig.workers[0].log.read_text()
    assert "resent (message lost)" in log
    say(f"queued job whose message was deleted from Redis: sent again by the reaper and "
        f"started {resent_s:.1f} s after the loss (grace {rig.settings.queued_grace_s:g} s, "
        f"incl. starting a worker), succeeded with 1 attempt; "
        f"{time.monotonic() - lost_at:.1f} s in all")
