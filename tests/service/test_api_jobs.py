"""Job endpoints over real HTTP, without a worker (jobs stay queued): submission of each kind
with validation and early 404s, listing, cancelling a queued job, and the server-sent event
stream (the record first, then the job's events, ending with the job).

The full train -> merge -> activate -> segment flow with a real Celery worker is tested with
the workers (tests/workers)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.service.api_support import (
    ADMIN_KEY,
    assert_problem,
    folder_entries,
    make_adapter,
    make_zip,
)

UNKNOWN_JOB = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def dataset(admin) -> str:
    response = admin.post("/v1/datasets", data={"name": "polyps"},
                          files={"file": ("d.zip", make_zip(folder_entries()),
                                          "application/zip")})
    assert response.status_code == 201, response.text
    return "polyps"


@pytest.fixture
def adapter_without_stats(admin, tmp_path) -> str:
    directory = make_adapter(tmp_path / "a", seed=3, stats=False)
    files = {"adapter_config": ("adapter_config.json",
                                (directory / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors",
                               (directory / "adapter_model.safetensors").read_bytes())}
    response = admin.post("/v1/adapters", data={"name": "plain"}, files=files)
    assert response.status_code == 201, response.text
    return "plain"


def submit_train(admin, dataset: str, **params):
    return admin.post("/v1/jobs/train", json={"dataset": dataset, "domain": "polyp",
                                              "params": params})


def test_train_job_is_queued_listed_and_cancelled(admin, anon, dataset):
    assert_problem(submit_train(admin, "nope"), 404, "not-found")
    assert_problem(submit_train(admin, dataset, epochs=0), 422, "invalid-argument")
    assert_problem(submit_train(admin, dataset, no_such_option=1), 422, "invalid-argument")
    bad_domain = admin.post("/v1/jobs/train", json={"dataset": dataset, "domain": "Bad!"})
    assert_problem(bad_domain, 422, "invalid-name")
    assert_problem(admin.post("/v1/jobs/train", json={"dataset": dataset}), 422,
                   "validation-error")

    response = submit_train(admin, dataset, epochs=2, rank=4)
    assert response.status_code == 202, response.text
    job = response.json()["job"]
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["kind"] == "train" and job["state"] == "queued" and job["progress"] == 0
    assert job["params"]["dataset"] == dataset and job["params"]["domain"] == "polyp"
    assert job["params"]["params"]["epochs"] == 2

    assert anon.get(f"/v1/jobs/{job['id']}").json() == job
    assert [j["id"] for j in anon.get("/v1/jobs", params={"kind": "train"}).json()["jobs"]] \
        == [job["id"]]
    assert anon.get("/v1/jobs", params={"kind": "merge"}).json() == {"jobs": []}
    assert_problem(anon.get("/v1/jobs", params={"limit": 0}), 422, "validation-error")
    assert_problem(anon.get(f"/v1/jobs/{UNKNOWN_JOB}"), 404, "not-found")
    assert_problem(anon.get("/v1/jobs/not-an-id"), 404, "not-found")

    cancelled = admin.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["job"]["state"] == "cancelled"
    assert cancelled.json()["job"]["cancel_requested"] is True
    assert_problem(admin.post(f"/v1/jobs/{job['id']}/cancel"), 409, "conflict")
    assert_problem(admin.post(f"/v1/jobs/{UNKNOWN_JOB}/cancel"), 404, "not-found")
    assert anon.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"


def test_merge_evaluate_and_stats_submission(admin, dataset, adapter_without_stats):
    plain = adapter_without_stats
    assert_problem(admin.post("/v1/jobs/merge", json={"adapters": ["ghost"]}), 404,
                   "not-found")
    body = assert_problem(admin.post("/v1/jobs/merge", json={"adapters": [plain]}), 409,
                          "missing-stats")
    assert "stats" in body["detail"]
    assert_problem(admin.post("/v1/jobs/merge", json={"adapters": [plain],
                                                      "method": "bogus"}), 422,
                   "invalid-argument")
    merge = admin.post("/v1/jobs/merge", json={"adapters": [plain], "method": "mean",
                                               "activate": True})
    assert merge.status_code == 202, merge.text
    assert merge.json()["job"]["params"]["activate"] is True

    evaluate = admin.post("/v1/jobs/evaluate", json={"datasets": [dataset]})
    assert evaluate.status_code == 202, evaluate.text
    assert_problem(admin.post("/v1/jobs/evaluate", json={"datasets": [dataset],
                                                         "version": 99}), 404, "not-found")
    assert_problem(admin.post("/v1/jobs/evaluate", json={"datasets": ["nope"]}), 404,
                   "not-found")

    stats = admin.post("/v1/jobs/stats", json={"adapter": plain, "dataset": dataset})
    assert stats.status_code == 202, stats.text
    assert stats.json()["job"]["params"]["params"]["output"] == f"{plain}-stats"
    kinds = [j["kind"] for j in admin.get("/v1/jobs").json()["jobs"]]
    assert kinds == ["stats", "evaluate", "merge"]


def events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """Server-sent events (name, data) from a line iterator; comment lines skipped."""
    name, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def test_event_stream_sends_the_record_first_and_ends_with_the_job(api, admin, dataset):
    job = submit_train(admin, dataset).json()["job"]
    with api.client() as follower, \
            follower.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        received = events(stream.iter_lines())
        name, first = next(received)
        assert name == "snapshot"
        assert first["job"]["id"] == job["id"] and first["job"]["state"] == "queued"
        with api.client(ADMIN_KEY) as other:
            assert other.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        rest = list(received)  # the stream ends by itself once the job is finished
    assert rest, "no event after the snapshot"
    assert rest[-1][1]["job"]["state"] == "cancelled"

    with api.client() as follower:  # a finished job: its record, then the end
        response = follower.get(f"/v1/jobs/{job['id']}/events")
    finished = list(events(iter(response.text.splitlines())))
    assert [(n, d["job"]["state"]) for n, d in finished] == [("snapshot", "cancelled")]
    with api.client() as follower:
        assert_problem(follower.get(f"/v1/jobs/{UNKNOWN_JOB}/events"), 404, "not-found")
