"""Bad job requests over real HTTP (no worker runs: nothing is ever picked up): unknown and
malformed job ids, cancelling a finished job, merges of adapters without statistics or made on
another base model, unknown names and bad parameters. Each is a 4xx problem with a stable
type and leaves the store (job records included) untouched."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.artifacts import ArtifactStore
from infra.registry import Registry
from tests.service.api_support import assert_problem

UNKNOWN_JOB = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def foreign_adapter(api, seeded, redis_server) -> str:
    """An adapter registered as made on another base model (as a registry shared with a
    deployment of another SAM would hold it)."""
    from infra.redis_client import connect

    client = connect(redis_server.url)
    registry = Registry(client, ArtifactStore(api.env["REGCL_ARTIFACT_URL"]))
    registry.add_adapter("foreign", Path(seeded.adapter_dir),
                         {"base_model": "vit_h", "base_fingerprint": "0" * 16})
    client.close()
    return "foreign"


def test_unknown_job_ids_are_404(anon, admin, store, seeded):
    with store.unchanged():
        for job_id in (UNKNOWN_JOB, "not-an-id", "..", "%2e%2e", "x" * 300, "0" * 32 + "%00"):
            assert_problem(anon.get(f"/v1/jobs/{job_id}"), 404, "not-found")
            assert_problem(admin.post(f"/v1/jobs/{job_id}/cancel"), 404, "not-found")
            assert_problem(anon.get(f"/v1/jobs/{job_id}/events"), 404, "not-found")


def test_cancelling_a_finished_job_is_409(admin, store, seeded):
    with store.unchanged():
        body = assert_problem(admin.post(f"/v1/jobs/{seeded.finished_job}/cancel"), 409,
                              "conflict")
        assert "cancelled" in body["detail"] or "finished" in body["detail"]


MERGES = {
    # case: (request body, status, code)
    "without-stats": ({"adapters": ["seed-plain"]}, 409, "missing-stats"),
    "without-stats-paper-method": ({"adapters": ["seed-stats", "seed-plain"],
                                    "method": "regcl"}, 409, "missing-stats"),
    "other-base-model": ({"adapters": ["foreign"]}, 422, "base-model-mismatch"),
    "mixed-base-models": ({"adapters": ["seed-stats", "foreign"]}, 422,
                          "base-model-mismatch"),
    "unknown-adapter": ({"adapters": ["ghost"]}, 404, "not-found"),
    "adapter-name-slip": ({"adapters": ["../seed-stats"]}, 422, "invalid-name"),
    "no-adapters": ({"adapters": []}, 422, "validation-error"),
    "unknown-method": ({"adapters": ["seed-stats"], "method": "bogus"}, 422,
                       "invalid-argument"),
    "bad-params": ({"adapters": ["seed-stats"], "params": {"no_such": 1}}, 422,
                   "invalid-argument"),
    "unknown-field": ({"adapters": ["seed-stats"], "force": True}, 422, "validation-error"),
}


@pytest.mark.parametrize("case", sorted(MERGES))
def test_bad_merge_is_refused(admin, store, foreign_adapter, case):
    body, status, code = MERGES[case]
    with store.unchanged():
        assert_problem(admin.post("/v1/jobs/merge", json=body), status, code)


OTHERS = {
    # case: (path, body, status, code)
    "train-unknown-dataset": ("/v1/jobs/train", {"dataset": "nope", "domain": "x"}, 404,
                              "not-found"),
    "train-dataset-slip": ("/v1/jobs/train", {"dataset": "../seed-data", "domain": "x"}, 422,
                           "invalid-name"),
    "train-bad-domain": ("/v1/jobs/train", {"dataset": "seed-data", "domain": "Bad!"}, 422,
                         "invalid-name"),
    "train-zero-epochs": ("/v1/jobs/train", {"dataset": "seed-data", "domain": "x",
                                             "params": {"epochs": 0}}, 422,
                          "invalid-argument"),
    "train-nan-lr": ("/v1/jobs/train", {"dataset": "seed-data", "domain": "x",
                                        "params": {"lr": "NaN"}}, 422, "invalid-argument"),
    "train-unknown-param": ("/v1/jobs/train", {"dataset": "seed-data", "domain": "x",
                                               "params": {"no_such": 1}}, 422,
                            "invalid-argument"),
    "train-adapter-taken": ("/v1/jobs/train", {"dataset": "seed-data", "domain": "x",
                                               "params": {"adapter": "seed-stats"}}, 409,
                            "conflict"),
    "train-domain-is-taken-adapter": ("/v1/jobs/train", {"dataset": "seed-data",
                                                         "domain": "seed-plain"}, 409,
                                      "conflict"),
    "stats-output-taken": ("/v1/jobs/stats", {"adapter": "seed-plain", "dataset": "seed-data",
                                              "params": {"output": "seed-stats"}}, 409,
                           "conflict"),
    # base, live and auto are what a request's adapter means besides a stored adapter
    **{f"train-domain-{name}": ("/v1/jobs/train", {"dataset": "seed-data", "domain": name},
                                422, "invalid-name") for name in ("base", "live", "auto")},
    "train-domain-auto-adapter-named": ("/v1/jobs/train", {"dataset": "seed-data",
                                                           "domain": "auto",
                                                           "params": {"adapter": "x"}}, 422,
                                        "invalid-name"),
    "train-adapter-auto": ("/v1/jobs/train", {"dataset": "seed-data", "domain": "x",
                                              "params": {"adapter": "auto"}}, 422,
                           "invalid-name"),
    "stats-output-live": ("/v1/jobs/stats", {"adapter": "seed-plain", "dataset": "seed-data",
                                             "params": {"output": "live"}}, 422,
                          "invalid-name"),
    "train-missing-domain": ("/v1/jobs/train", {"dataset": "seed-data"}, 422,
                             "validation-error"),
    "evaluate-unknown-version": ("/v1/jobs/evaluate", {"datasets": ["seed-data"],
                                                       "version": 99}, 404, "not-found"),
    "evaluate-unknown-dataset": ("/v1/jobs/evaluate", {"datasets": ["nope"]}, 404,
                                 "not-found"),
    "evaluate-unknown-adapter": ("/v1/jobs/evaluate", {"datasets": ["seed-data"],
                                                       "adapter": "ghost"}, 404, "not-found"),
    "evaluate-no-datasets": ("/v1/jobs/evaluate", {"datasets": []}, 422, "validation-error"),
    "stats-unknown-adapter": ("/v1/jobs/stats", {"adapter": "ghost", "dataset": "seed-data"},
                              404, "not-found"),
    "stats-unknown-dataset": ("/v1/jobs/stats", {"adapter": "seed-plain", "dataset": "nope"},
                              404, "not-found"),
    "body-not-json": ("/v1/jobs/train", None, 422, "validation-error"),
}


@pytest.mark.parametrize("case", sorted(OTHERS))
def test_bad_job_submission_is_refused(admin, store, case):
    path, body, status, code = OTHERS[case]
    with store.unchanged():
        if body is None:
            response = admin.post(path, content=b"{nope",
                                  headers={"content-type": "application/json"})
        else:
            response = admin.post(path, json=body)
        assert_problem(response, status, code)


def test_bad_list_queries(anon, store):
    with store.unchanged():
        for params in ({"limit": 0}, {"limit": 100_000}, {"limit": "x"}, {"kind": "k" * 65}):
            assert_problem(anon.get("/v1/jobs", params=params), 422, "validation-error")


def test_activating_unknown_or_malformed_versions(admin, store):
    with store.unchanged():
        assert_problem(admin.post("/v1/versions/99/activate"), 404, "not-found")
        assert_problem(admin.post("/v1/versions/-1/activate"), 404, "not-found")
        assert_problem(admin.post("/v1/versions/x/activate"), 422, "validation-error")
