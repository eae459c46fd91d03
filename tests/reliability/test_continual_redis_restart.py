"""redis-server SIGKILLed and restarted (append-only file on) while a continual step runs (#24
case 2): the step ends exactly once, with one snapshot, one adapter, one candidate version and
a live pointer that says what the gate decided; the sample set is what it was. Real
redis-server, one real Celery worker (``support.Rig``).

The worker pauses the step at a phase (``REGCL_FAULT_PAUSE``) so that Redis is away at a known
point. In the suite: ``merge`` with Redis away 6 s, twice the merge lock's lease: the lock
lapses, the candidate is not registered under it, and the step merges again (before that,
the step failed as ``MergeLockLost``: this case can fail). Opt-in
(``REGCL_TEST_MORE_FAULTS=1``): ``merge`` with Redis away 2 s (the lock survives; it passed
before the rerun changes as well) and ``gate`` (the candidate stored, nothing decided).
"""

from __future__ import annotations

import time

import pytest

from infra import keys
from infra.jobs import JobState
from infra.project_serving import ProjectServing
from tests.reliability.support import Rig, more_faults, poll, say
from tests.reliability.test_continual_kill import DOMAIN, STEP, fill_sample_set
from workers.submit import submit_continual

pytestmark = pytest.mark.slow

PAUSE_S = 8.0


@pytest.mark.parametrize(("phase", "down_s"), [
    pytest.param("merge", 2.0, marks=more_faults), pytest.param("gate", 2.0, marks=more_faults),
    ("merge", 6.0)])
def test_redis_restarted_during_a_continual_step_the_step_ends_once(
        rig: Rig, phase: str, down_s: float) -> None:
    sets = fill_sample_set(rig)
    log_before = rig.client.lrange(keys.samples(DOMAIN, "log"), 0, -1)
    rig.start_workers("w", env={"REGCL_FAULT_PAUSE": f"{phase}:{PAUSE_S:g}"})
    job = submit_continual(rig.celery, rig.jobs, domain=DOMAIN, project=7, params=STEP)
    poll(lambda: rig.jobs.get(job.id).detail.get("phase") == phase, f"the step to reach {phase}",
         on_timeout=rig.log_tails)
    time.sleep(1.5)  # appendfsync everysec: the phase's writes are on disk
    rig.crash_redis()
    time.sleep(down_s)
    restart_s = rig.start_redis()
    restarted_at = time.monotonic()
    done = rig.wait(job)
    ended_s = time.monotonic() - restarted_at
    assert done.state is JobState.SUCCEEDED, (done.error, rig.log_tails())
    result = done.result

    datasets = sorted(d.name for d in rig.datasets.list_datasets())
    assert datasets == [f"{DOMAIN}-s1-heldout", f"{DOMAIN}-s1-train"]
    assert [a.name for a in rig.registry.list_adapters()] == [f"{DOMAIN}-s1"]
    versions = rig.registry.list_versions()
    assert [v.number for v in versions] == [result["version"]]
    assert versions[0].lineage["job_id"] == job.id
    assert rig.registry.live_version() == (result["version"] if result["activated"] else None)
    assert result["activated"] == result["gate"]["passed"]
    record = ProjectServing(rig.client).get(DOMAIN)
    assert record.last_check is not None and record.last_check.job_id == job.id

    time.sleep(5.0)  # a few reaper rounds: nothing moves any more
    assert rig.jobs.get(job.id).attempts == done.attempts <= 2
    assert rig.jobs.get(job.id).state is JobState.SUCCEEDED
    assert rig.messages_of(job.id) == 0 and rig.jobs.active() == []
    assert rig.client.lrange(keys.samples(DOMAIN, "log"), 0, -1) == log_before
    assert sets.pending(DOMAIN) == 0
    figures = rig.check_store()
    merged_again = "merging again" in rig.workers[0].log.read_text(errors="replace")
    say(f"redis SIGKILLed for {down_s:g} s while a continual step paused at {phase!r} "
        f"(restart {restart_s:.2f} s): job succeeded {ended_s:.1f} s after the restart with "
        f"{done.attempts} attempt(s), merged again {merged_again}; datasets {len(datasets)}, "
        f"adapters {figures['adapters']}, versions {figures['versions']}, live "
        f"{rig.registry.live_version()} (gate passed {result['gate']['passed']}); sample-set "
        f"log {len(log_before)} entries unchanged; messages left 0; lost 0, duplicated 0")
