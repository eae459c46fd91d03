"""infra.project_serving on a real redis-server: a step's check that passes makes its adapter
the domain's; one that fails leaves the domain on what served it before (only ``last_check``
changes); a tie passes, an empty held-out set does not; the history keeps the changes in order; a
job's check is stored once (a rerun of the job writes nothing)."""

from __future__ import annotations

import hashlib

import redis

from infra.project_serving import HISTORY, ProjectServing, ServingCheck


def _check(adapter: str, adapter_iou: float, live_iou: float, samples: int = 4) -> ServingCheck:
    return ServingCheck(adapter, hashlib.sha256(adapter.encode()).hexdigest(), adapter_iou,
                        "live:1", live_iou, samples, job_id=f"job-{adapter}")


def test_a_passing_check_serves_and_a_failing_one_keeps_what_served(
        redis_client: redis.Redis) -> None:
    serving = ProjectServing(redis_client)
    assert serving.get("polyp").adapter is None and serving.all() == {}

    first = serving.record("polyp", _check("polyp-s1", 0.71, 0.52))
    assert first.adapter == "polyp-s1" and first.check is not None and first.check.passed
    assert first.since == first.check.at and len(first.history) == 1

    worse = serving.record("polyp", _check("polyp-s2", 0.60, 0.66))
    assert not worse.last_check.passed
    stored = serving.get("polyp")
    assert stored.adapter == "polyp-s1" and stored.sha256 == first.sha256  # kept
    assert stored.check == first.check and stored.since == first.since
    assert stored.last_check.adapter == "polyp-s2" and "does not beat" in \
        stored.last_check.describe()

    better = serving.record("polyp", _check("polyp-s3", 0.80, 0.70))
    assert better.adapter == "polyp-s3" and [h["adapter"] for h in better.history] == [
        "polyp-s1", "polyp-s3"]
    assert serving.get("polyp") == better
    assert set(serving.all()) == {"polyp"}


def test_a_tie_passes_an_empty_held_out_set_does_not(redis_client: redis.Redis) -> None:
    serving = ProjectServing(redis_client)
    assert serving.record("shadow", _check("shadow-s2", 0.9, 0.1, samples=0)).adapter is None
    tie = serving.record("shadow", _check("shadow-s1", 0.5, 0.5))
    assert tie.adapter == "shadow-s1" and "matches live:1" in tie.check.describe()
    assert serving.record("shadow", _check("shadow-s3", 0.49, 0.5)).adapter == "shadow-s1"
    assert serving.get("shadow").last_check.adapter == "shadow-s3"
    assert serving.forget("shadow") and serving.get("shadow").last_check is None


def test_the_history_is_bounded(redis_client: redis.Redis) -> None:
    serving = ProjectServing(redis_client)
    for i in range(HISTORY + 3):
        record = serving.record("camo", _check(f"camo-s{i}", 0.5 + i / 100, 0.4))
    assert len(record.history) == HISTORY
    assert record.history[0]["adapter"] == "camo-s3" and record.adapter == f"camo-s{HISTORY + 2}"


def test_a_jobs_check_is_stored_once(redis_client: redis.Redis) -> None:
    serving = ProjectServing(redis_client)
    first = serving.record("skin", _check("skin-s1", 0.7, 0.5))
    rerun = serving.record("skin", _check("skin-s1", 0.7, 0.5))  # same job id, later `at`
    assert rerun == first == serving.get("skin") and len(rerun.history) == 1
    assert serving.record("skin", _check("skin-s2", 0.8, 0.7)).history[-1]["adapter"] == \
        "skin-s2"
