"""Jobs end to end through a real Redis and a real Celery worker process (see conftest.py).

Small on purpose: 8 synthetic 256 px images per domain, the tiny SAM, rank 4, one epoch.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from infra import keys
from infra.errors import NotFound
from infra.jobs import JobRecord, JobState
from regcl.adapters import read_adapter
from regcl.merging import ContinualMergeState, merge_adapters
from tests.workers.worker_support import Cluster
from workers.celery_app import GPU_QUEUE, MAX_ATTEMPTS, TRAIN
from workers.params import DEFAULT_MERGE_METHOD
from workers.submit import cancel_job, submit_evaluate, submit_merge, submit_stats, submit_train

SMALL = {"epochs": 1, "rank": 4, "batch_size": 4}
DOMAINS = ("polyp", "camo", "shadow")


class EventLog:
    """Every job event published while it exists (pub/sub on ``keys.JOB_EVENTS_CHANNEL``)."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(keys.JOB_EVENTS_CHANNEL)
        self.pubsub.get_message(timeout=5.0)  # the subscribe confirmation
        self.events: list[dict] = []

    def drain(self) -> list[dict]:
        while (message := self.pubsub.get_message(timeout=0.2)) is not None:
            self.events.append(json.loads(message["data"]))
        return self.events

    def of(self, job_id: str, event: str | None = None) -> list[dict]:
        return [e for e in self.drain()
                if e["job"]["id"] == job_id and (event is None or e["event"] == event)]


@pytest.fixture(scope="module")
def trained(cluster: Cluster) -> Iterator[tuple[dict[str, JobRecord], EventLog]]:
    """Three domain adapters trained by the worker (polyp, camo, shadow), and the events."""
    log = EventLog(cluster.client)
    submitted = {}
    for domain in DOMAINS:
        cluster.add_dataset(domain)
        submitted[domain] = submit_train(cluster.celery, cluster.jobs, dataset=domain,
                                         domain=domain, params=SMALL)
    yield {d: cluster.wait(job) for d, job in submitted.items()}, log
    log.pubsub.close()


def test_train_job_registers_an_adapter_with_stats(cluster: Cluster, trained) -> None:
    records, log = trained
    job = records["polyp"]
    assert job.state is JobState.SUCCEEDED, job.error
    assert job.attempts == 1 and job.progress == 1.0
    assert job.worker == cluster.hostname
    assert job.result["adapter"] == "polyp"
    assert job.result["samples"] == {"train": 7, "holdout": 1, "dropped": 0}
    for split in ("holdout", "holdout_base"):
        assert set(job.result["metrics"][split]) == {"iou", "dice", "mae"}

    progress = [e["job"]["detail"] for e in log.of(job.id, "progress")]
    steps = [d for d in progress if d.get("phase") == "train" and "step" in d]
    assert steps and steps[-1]["step"] == steps[-1]["total"] == 2  # 7 images, batch 4
    assert [d["phase"] for d in progress if "step" not in d] == \
        ["prepare", "train", "stats", "register"]
    assert [e["event"] for e in log.of(job.id) if e["event"] != "progress"] == \
        ["created", "running", "succeeded"]

    adapter = cluster.registry.get_adapter("polyp")
    assert adapter.has_stats and adapter.sha256 == job.result["sha256"]
    meta = adapter.metadata
    assert meta["domain"] == "polyp" and meta["base_model"] == "tiny"
    assert len(meta["base_fingerprint"]) == 16 and meta["job_id"] == job.id
    assert meta["dataset"]["name"] == "polyp"
    assert meta["dataset"]["sha256"] == cluster.datasets.get_dataset("polyp").sha256
    files = read_adapter(cluster.registry.fetch_adapter("polyp", cluster.tmp / "fetched"))
    assert files.config.r == 4 and files.stats is not None
    assert files.metadata["base_fingerprint"] == meta["base_fingerprint"]


def test_the_same_train_job_gives_the_same_adapter(cluster: Cluster, trained) -> None:
    """A train job's adapter depends on its parameters and data only, not on what the worker
    process ran before (its initial LoRA weights come from the job's seed): polyp again, after
    three trainings in this worker, gives polyp's weights bit for bit; another seed does not."""
    records, _ = trained
    again = {seed: cluster.wait(submit_train(
        cluster.celery, cluster.jobs, dataset="polyp", domain="polyp",
        params={**SMALL, "seed": seed, "adapter": f"polyp-seed{seed}"})) for seed in (0, 1)}
    assert all(job.state is JobState.SUCCEEDED for job in again.values())
    weights = {name: read_adapter(cluster.registry.fetch_adapter(
        name, cluster.tmp / f"same-{name}")).weights
        for name in ("polyp", "polyp-seed0", "polyp-seed1")}
    try:
        assert weights["polyp"].keys() == weights["polyp-seed0"].keys()
        assert all(torch.equal(w, weights["polyp-seed0"][k]) for k, w in weights["polyp"].items())
        assert not all(torch.equal(w, weights["polyp-seed1"][k])
                       for k, w in weights["polyp"].items())
        for split in ("holdout", "holdout_base"):
            assert again[0].result["metrics"][split] == records["polyp"].result["metrics"][split]
    finally:
        for name in ("polyp-seed0", "polyp-seed1"):
            cluster.registry.delete_adapter(name)


def test_merges_fold_adapters_into_numbered_versions(cluster: Cluster, trained,
                                                     tmp_path: Path) -> None:
    records, _ = trained
    assert all(r.state is JobState.SUCCEEDED for r in records.values())
    # The only test that makes versions: the worker's database is fresh, so they start at 1.
    first = cluster.wait(submit_merge(cluster.celery, cluster.jobs, adapters=["polyp", "camo"],
                                      activate=True))
    assert first.state is JobState.SUCCEEDED, first.error
    assert first.result == {"version": 1, "created": True, "domains": ["polyp", "camo"],
                            "folded": ["polyp", "camo"], "activated": True}
    assert cluster.registry.live_version() == 1
    lineage = cluster.registry.get_version(1).lineage
    assert lineage["parent"] is None and lineage["domains"] == ["polyp", "camo"]
    assert lineage["method"] == DEFAULT_MERGE_METHOD and lineage["job_id"] == first.id
    assert lineage["adapters"] == {n: cluster.registry.get_adapter(n).sha256
                                   for n in ("polyp", "camo")}

    second = cluster.wait(submit_merge(cluster.celery, cluster.jobs,
                                       adapters=["polyp", "camo", "shadow"]))
    assert second.state is JobState.SUCCEEDED, second.error
    assert second.result["version"] == 2 and second.result["folded"] == ["shadow"]
    assert cluster.registry.live_version() == 1  # not activated
    lineage = cluster.registry.get_version(2).lineage
    assert lineage["parent"] == 1 and lineage["domains"] == list(DOMAINS)
    assert set(lineage["adapters"]) == set(DOMAINS) == set(lineage["scores"])

    # Folding into version 1's state equals merging all three adapters at once.
    version = cluster.registry.fetch_version(2, tmp_path / "v")
    assert ContinualMergeState.load(version / "merge_state.safetensors").domains == DOMAINS
    adapters = [read_adapter(cluster.registry.fetch_adapter(n, tmp_path / "a")) for n in DOMAINS]
    expected = merge_adapters(DEFAULT_MERGE_METHOD, [a.weights for a in adapters],
                              [a.stats for a in adapters])
    merged = read_adapter(version / "adapter").weights
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-4, atol=1e-6)

    # Nothing new to fold: no new version.
    third = cluster.wait(submit_merge(cluster.celery, cluster.jobs, adapters=["camo"]))
    assert third.result["version"] == 2 and third.result["created"] is False
    assert cluster.registry.latest_version().number == 2

    scores = cluster.wait(submit_evaluate(cluster.celery, cluster.jobs, datasets=["polyp"],
                                          version=2, params={"max_samples": 4}))
    assert scores.state is JobState.SUCCEEDED, scores.error
    assert scores.result["target"] == "version:2"
    assert set(scores.result["metrics"]["polyp"]) == {"iou", "dice", "mae", "count", "clicks"}
    assert scores.result["metrics"]["polyp"]["count"] == 4
    clicks = scores.result["metrics"]["polyp"]["clicks"]
    assert clicks["max_clicks"] == 20 and clicks["feedback"] is True
    assert all(1 <= clicks[f"noc@{k}"] <= 20 for k in (80, 85, 90))
    assert all(0 <= clicks[f"iou@{k}"] <= 1 for k in (1, 3, 5, 10))


def test_cancel_a_running_and_a_queued_job(cluster: Cluster) -> None:
    cluster.add_dataset("polyp")
    running = submit_train(cluster.celery, cluster.jobs, dataset="polyp", domain="polyp",
                           params={**SMALL, "epochs": 500, "adapter": "polyp-long"})
    cluster.wait_until(lambda: cluster.jobs.get(running.id).detail.get("step", 0) >= 1,
                       "the long job to train")
    queued = submit_train(cluster.celery, cluster.jobs, dataset="polyp", domain="polyp",
                          params={**SMALL, "adapter": "polyp-queued"})
    assert queued.state is JobState.QUEUED  # the solo worker is busy
    cancelled = cancel_job(cluster.celery, cluster.jobs, queued.id)
    assert cancelled.state is JobState.CANCELLED  # at once: it never ran

    flagged = cancel_job(cluster.celery, cluster.jobs, running.id)
    assert flagged.state is JobState.RUNNING and flagged.cancel_requested
    done = cluster.wait(running)
    assert done.state is JobState.CANCELLED and done.result is None
    assert done.detail["step"] < done.detail["total"]  # stopped early

    # A job behind the cancelled one: once it has run, the worker has seen (and skipped) that.
    sentinel = cluster.wait(submit_train(cluster.celery, cluster.jobs, dataset="absent",
                                         domain="skin", params=SMALL))
    assert sentinel.state is JobState.FAILED
    assert cluster.jobs.get(queued.id).state is JobState.CANCELLED
    assert cluster.jobs.get(queued.id).attempts == 0
    for name in ("polyp-long", "polyp-queued"):
        with pytest.raises(NotFound):
            cluster.registry.get_adapter(name)


def test_bad_input_fails_once_with_a_clear_error(cluster: Cluster, trained,
                                                  tmp_path: Path) -> None:
    unknown = cluster.wait(submit_train(cluster.celery, cluster.jobs, dataset="nowhere",
                                        domain="skin", params=SMALL))
    assert unknown.state is JobState.FAILED and unknown.attempts == 1
    assert (unknown.error.type, unknown.error.message) == \
        ("NotFound", "dataset 'nowhere' not found")

    taken = cluster.wait(submit_train(cluster.celery, cluster.jobs, dataset="polyp",
                                      domain="polyp", params=SMALL))
    assert taken.state is JobState.FAILED and taken.error.type == "Conflict"
    assert "already exists" in taken.error.message and taken.attempts == 1

    # An adapter uploaded without Gram statistics cannot be RegCL-merged...
    plain = tmp_path / "plain"
    shutil.copytree(cluster.registry.fetch_adapter("camo", tmp_path / "cache"), plain)
    (plain / "regcl_stats.safetensors").unlink()
    cluster.registry.add_adapter("camo-plain", plain, {"domain": "camo"})
    merge = cluster.wait(submit_merge(cluster.celery, cluster.jobs, adapters=["camo-plain"]))
    assert merge.state is JobState.FAILED and merge.attempts == 1
    assert merge.error.type == "StatsError" and "no Gram statistics" in merge.error.message
    missing = cluster.wait(submit_merge(cluster.celery, cluster.jobs, adapters=["ghost"]))
    assert (missing.state, missing.error.type) == (JobState.FAILED, "NotFound")

    # ... until a stats job computes them, into a new adapter (adapters are immutable).
    stats = cluster.wait(submit_stats(cluster.celery, cluster.jobs, adapter="camo-plain",
                                      dataset="camo", params={"max_samples": 4}))
    assert stats.state is JobState.SUCCEEDED, stats.error
    assert stats.result["adapter"] == "camo-plain-stats" and stats.result["samples"] == 4
    made = cluster.registry.get_adapter("camo-plain-stats")
    assert made.has_stats and made.metadata["stats_from"]["adapter"] == "camo-plain"
    assert not cluster.registry.get_adapter("camo-plain").has_stats
    weights = read_adapter(cluster.registry.fetch_adapter("camo-plain-stats", tmp_path / "c"))
    for key, value in read_adapter(plain).weights.items():
        assert torch.equal(weights.weights[key], value)


def test_a_job_whose_worker_keeps_dying_is_failed_not_rerun(cluster: Cluster) -> None:
    """A redelivered job counts as a new attempt; past MAX_ATTEMPTS it fails instead of
    running (simulated: the earlier starts are recorded as a dead worker would leave them)."""
    cluster.add_dataset("polyp")
    kwargs = {"dataset": "polyp", "domain": "polyp", "params": {**SMALL, "adapter": "never"}}
    job_id = cluster.jobs.create("train", kwargs)
    for _ in range(MAX_ATTEMPTS):
        cluster.jobs.mark_running(job_id)
    cluster.celery.send_task(TRAIN, kwargs={"job_id": job_id, **kwargs}, task_id=job_id,
                             queue=GPU_QUEUE)
    done = cluster.wait(job_id)
    assert done.state is JobState.FAILED and done.error.type == "WorkerLost"
    assert done.attempts == MAX_ATTEMPTS + 1
    with pytest.raises(NotFound):
        cluster.registry.get_adapter("never")


def test_the_broker_keeps_its_keys_in_the_regcl_namespace(cluster: Cluster, trained) -> None:
    names = list(cluster.client.scan_iter())
    assert any(n.startswith(keys.CELERY_KEY_PREFIX) for n in names)
    assert [n for n in names if not n.startswith(keys.PREFIX)] == []
