"""Jobs, their server-sent events, ``wait`` and versions through the HTTP client, with a REAL
Celery worker running what is submitted (see conftest.py): train → stats → merge (activate)
→ evaluate → the continual matrix, and a job that outlasts ``wait``'s timeout."""

from __future__ import annotations

import pytest

from regcl.client import (
    Client,
    ConflictError,
    InvalidRequestError,
    JobEvent,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
)
from tests.service.api_support import make_image
from tests.workers.worker_support import JOB_TIMEOUT_S, write_domain_dataset

pytestmark = pytest.mark.slow

DATASET = "client-polyp"
ADAPTER = "client-polyp-lora"
TRAIN = {"adapter": ADAPTER, "epochs": 1, "rank": 4, "batch_size": 4}
SMALL = {"max_samples": 4, "batch_size": 4}


@pytest.fixture(scope="module")
def dataset(platform, tmp_path_factory) -> str:
    folder = write_domain_dataset(tmp_path_factory.mktemp("client-data") / "polyp", "polyp", 6)
    with platform.client() as client:
        client.upload_dataset(DATASET, folder, metadata={"domain": "polyp"})
    return DATASET


def test_train_stats_merge_evaluate_and_the_matrix(admin: Client, anon: Client, dataset,
                                                   platform):
    job = admin.submit_train(dataset, "polyp", **TRAIN)
    assert (job.kind, job.params["params"]["epochs"]) == ("train", 1)
    assert job.state in ("queued", "running")  # the idle worker may have taken it already
    events = list(anon.events(job))
    names = [e.event for e in events]
    assert names[0] == "snapshot" and events[-1].job.finished, (names, platform.logs())
    assert events[-1].job.state == "succeeded", (events[-1].job, platform.logs())
    assert "progress" in names and any(e.job.detail.get("phase") == "train" for e in events)
    assert [e.id for e in events] == list(range(len(events)))
    trained = anon.wait(job, timeout=5)  # finished already: answered at once
    assert trained.state == "succeeded" and trained.result["adapter"] == ADAPTER
    assert trained.finished_at is not None and trained.attempts == 1
    assert anon.get_adapter(ADAPTER).has_stats

    stats = admin.wait(admin.submit_stats(ADAPTER, dataset, params={**SMALL,
                                                                    "output": "client-stats"}),
                       JOB_TIMEOUT_S, check=True)
    assert stats.result is not None and anon.get_adapter("client-stats").has_stats

    seen: list[JobEvent] = []
    merge = admin.wait(admin.submit_merge([ADAPTER], method="regcl", activate=True),
                       JOB_TIMEOUT_S, check=True, on_event=seen.append)
    assert seen and seen[0].event == "snapshot" and seen[-1].job == merge
    version = merge.result["version"]
    assert merge.result["activated"] is True
    live = anon.wait_served(version, timeout=120)
    assert live.live_version == live.served_version == version
    assert live.adapter_version == f"live:{version}"
    assert anon.segment(make_image(3), points=[[40.0, 30.0]]).adapter_version \
        == f"live:{version}"
    versions = anon.list_versions()
    assert versions[-1].number == version and versions[-1].live
    assert anon.get_version(version).lineage["domains"] == [ADAPTER]
    again = admin.activate(version)
    assert again.version.number == version and again.previous_version == version
    assert again.served_version == version

    evaluation = admin.wait(admin.submit_evaluate([dataset], version=version, params=SMALL),
                            JOB_TIMEOUT_S, check=True)
    matrix = anon.matrix()
    assert matrix.iou(f"version:{version}", dataset) == pytest.approx(
        evaluation.result["metrics"][dataset]["iou"])
    assert matrix.domains[dataset] == "polyp" and matrix.live_version == version
    assert matrix.iou("base", dataset) is None  # not evaluated

    ids = {j.kind: j.id for j in reversed(anon.list_jobs(limit=10))}  # the newest of each
    assert ids == {"train": job.id, "stats": stats.id, "merge": merge.id,
                   "evaluate": evaluation.id}
    trains = anon.list_jobs(kind="train")
    assert job.id in [j.id for j in trains] and {j.kind for j in trains} == {"train"}
    with pytest.raises(ConflictError):  # finished: nothing to cancel
        admin.cancel_job(job)


def test_wait_times_out_on_a_long_job_and_a_cancelled_job_fails_a_checked_wait(
        admin: Client, anon: Client, dataset, platform):
    job = admin.submit_train(dataset, "polyp", adapter="client-long", epochs=500, rank=4,
                             batch_size=4)
    with pytest.raises(JobTimeoutError) as timeout:
        anon.wait(job, timeout=1.0)
    assert timeout.value.job is not None and timeout.value.job.id == job.id
    assert not timeout.value.job.finished and isinstance(timeout.value, TimeoutError)
    admin.cancel_job(job)
    with pytest.raises(JobFailedError) as failed:
        anon.wait(job, timeout=JOB_TIMEOUT_S, check=True)
    assert failed.value.job.state == "cancelled", platform.logs()
    assert anon.wait(job, timeout=5).state == "cancelled"  # unchecked: returned
    with pytest.raises(NotFoundError):
        anon.get_adapter("client-long")


def test_events_and_submissions_of_what_does_not_exist(admin: Client, anon: Client, dataset):
    with pytest.raises(NotFoundError):
        list(anon.events("0123456789abcdef0123456789abcdef"))
    with pytest.raises(NotFoundError):
        anon.wait("0123456789abcdef0123456789abcdef", timeout=5)
    with pytest.raises(NotFoundError):
        admin.submit_train("no-such-dataset", "polyp")
    with pytest.raises(InvalidRequestError) as invalid:
        admin.submit_train(dataset, "polyp", epochs=0)
    assert invalid.value.code == "invalid-argument"
    with pytest.raises(NotFoundError):
        admin.submit_evaluate([dataset], version=999)
