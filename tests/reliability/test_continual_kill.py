"""A worker SIGKILLed in the middle of a continual step (#24 case 6): the reaper reruns the job
once, and the rerun takes up what the killed attempt made instead of making it again: one
snapshot (one ``<domain>-s<n>-train`` / ``-heldout`` pair), one ``<domain>-s<n>`` adapter, one
candidate version, the gate decided once, the domain's serving record written once. Real
redis-server, real Celery worker processes (``support.Rig``), a sample set filled as webhooks
fill it (:meth:`infra.sample_sets.SampleSets.put`).

Killed at ``gate`` (the candidate is stored, nothing decided) and, opt-in
(``REGCL_TEST_MORE_FAULTS=1``), at ``serving`` (the gate has decided and the candidate is live;
the serving record is not written yet).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import torch

from infra import keys
from infra.jobs import JobState
from infra.project_serving import ProjectServing
from infra.sample_sets import SampleSets
from regcl.data.domains import domain_split
from tests.reliability.support import Rig, more_faults, poll, say
from tests.service.api_support import png_bytes
from workers.submit import submit_continual

pytestmark = pytest.mark.slow

DOMAIN = "kidney"
COUNT = 8
STEP = {"train": {"epochs": 2, "rank": 4, "batch_size": 4}, "holdout": 0.25, "tolerance": 0.02,
        "eval_samples": 4}


def fill_sample_set(rig: Rig) -> SampleSets:
    """``COUNT`` annotated tasks of the polyp domain, one mask each, put one by one."""
    sets = SampleSets(rig.client, rig.store, rig.datasets)
    images, masks = domain_split("polyp", "train", COUNT)
    for i in range(COUNT):
        image = png_bytes(images[i].permute(1, 2, 0).to(torch.uint8).numpy())
        mask = png_bytes(masks[i].numpy().astype(np.uint8) * 255)
        sets.put(DOMAIN, 100 + i, i, hashlib.sha256(image).hexdigest(), image, [mask])
    return sets


@pytest.mark.parametrize("phase", ["gate", pytest.param("serving", marks=more_faults)])
def test_a_worker_killed_mid_continual_step_is_rerun_without_duplicates(
        rig: Rig, phase: str) -> None:
    sets = fill_sample_set(rig)
    log_before = rig.client.lrange(keys.samples(DOMAIN, "log"), 0, -1)
    rig.start_workers("doomed", env={"REGCL_FAULT_PAUSE": f"{phase}:600"})
    job = submit_continual(rig.celery, rig.jobs, domain=DOMAIN, project=7, params=STEP)
    poll(lambda: rig.jobs.get(job.id).detail.get("phase") == phase, f"the step to reach {phase}",
         on_timeout=rig.log_tails)
    made = {"versions": [v.number for v in rig.registry.list_versions()],
            "live": rig.registry.live_version()}
    rig.workers[0].kill()
    killed_at = time.monotonic()

    rig.start_workers("rerun")
    done = rig.wait(job)
    total_s = time.monotonic() - killed_at
    assert done.state is JobState.SUCCEEDED, (done.error, rig.log_tails())
    assert done.attempts == 2
    result = done.result
    say(f"after the rerun: datasets {sorted(d.name for d in rig.datasets.list_datasets())}, "
        f"adapters {[a.name for a in rig.registry.list_adapters()]}, versions "
        f"{[v.number for v in rig.registry.list_versions()]}, live {rig.registry.live_version()}")

    # one snapshot, one adapter, one candidate version: the killed attempt's
    datasets = sorted(d.name for d in rig.datasets.list_datasets())
    assert datasets == [f"{DOMAIN}-s1-heldout", f"{DOMAIN}-s1-train"]
    adapters = [a.name for a in rig.registry.list_adapters()]
    assert adapters == [f"{DOMAIN}-s1"] == [result["adapter"]]
    assert rig.registry.get_adapter(adapters[0]).metadata["job_id"] == job.id
    versions = rig.registry.list_versions()
    assert [v.number for v in versions] == made["versions"] == [result["version"]]
    assert versions[0].lineage["job_id"] == job.id

    # the gate decided once; the live pointer is what it decided
    gate = result["gate"]
    assert result["activated"] == gate["passed"]
    assert rig.registry.live_version() == (result["version"] if result["activated"] else None)
    rerun_log = rig.workers[1].log.read_text(errors="replace")
    assert ("the gate was decided by an earlier attempt" in rerun_log) == (phase == "serving")
    assert f"candidate version {result['version']} was stored by an earlier attempt" in rerun_log
    if phase == "serving":  # decided (and activated, if it passed) by the killed attempt
        assert made["live"] == rig.registry.live_version()
        assert "went live while this step ran" not in gate["reason"]

    # the serving record written once, by this job
    record = ProjectServing(rig.client).get(DOMAIN)
    assert record.last_check is not None and record.last_check.job_id == job.id
    assert len(record.history) == (1 if result["serving"]["check"]["passed"] else 0)

    # the sample set itself untouched, nothing pending
    assert rig.client.lrange(keys.samples(DOMAIN, "log"), 0, -1) == log_before
    assert sets.pending(DOMAIN) == 0
    assert rig.messages_of(job.id) == 0 and rig.jobs.active() == []
    figures = rig.check_store()
    say(f"continual step killed at {phase!r}: rerun (attempt {done.attempts}) succeeded "
        f"{total_s:.1f} s after the kill (incl. starting a worker); datasets {len(datasets)}, "
        f"adapters {figures['adapters']}, versions {figures['versions']}, live "
        f"{rig.registry.live_version()}, gate passed {gate['passed']} "
        f"({gate['reason'][:80]!r}), serving history {len(record.history)}; "
        "lost 0, duplicated 0")
