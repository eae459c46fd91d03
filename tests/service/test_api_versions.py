"""Merged versions over real HTTP: activation hot-swaps the serving model (responses name the
new version, masks change), rollback, a refused version changes nothing, the server follows a
pointer moved by another process, and a restarted server serves the live version from Redis.

The server of this module has its own Redis database (2), so that moving the live pointer
here does not reach the session's shared server.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from infra.artifacts import ArtifactStore
from infra.jobs import JobStore
from infra.redis_client import connect
from infra.registry import Registry
from tests import databases
from tests.service.api_support import (
    ADMIN_KEY,
    ApiServer,
    assert_problem,
    make_adapter,
    make_image,
    png_bytes,
)

BOX = [10.0, 8.0, 90.0, 70.0]
DB = databases.VERSIONS


@pytest.fixture(scope="module")
def redis_url(redis_server) -> str:
    return databases.emptied(redis_server, DB)


@pytest.fixture(scope="module")
def server(redis_url, start_api, tmp_path_factory) -> ApiServer:
    return start_api(redis_url, tmp_path_factory.mktemp("api-versions"))


@pytest.fixture(scope="module")
def registry(server, redis_url) -> Iterator[Registry]:
    """The same registry the server uses (same Redis database, same artifact store)."""
    client = connect(redis_url)
    yield Registry(client, ArtifactStore(server.env["REGCL_ARTIFACT_URL"]))
    client.close()


@pytest.fixture(scope="module")
def versions(registry, tmp_path_factory) -> dict[str, int]:
    """Two good versions (different random LoRA weights) and one with a NaN weight."""
    root = tmp_path_factory.mktemp("versions")
    state = root / "merge_state.safetensors"
    save_file({"step": torch.zeros(1)}, str(state))
    a = make_adapter(root / "a", seed=5, stats=False)
    b = make_adapter(root / "b", seed=6, stats=False)
    broken = make_adapter(root / "broken", seed=7, stats=False)
    weights = load_file(str(broken / "adapter_model.safetensors"))
    key = sorted(weights)[0]
    weights[key][0, 0] = float("nan")
    save_file(weights, str(broken / "adapter_model.safetensors"))
    return {name: registry.create_version(path, state, {"domains": [name]}).number
            for name, path in (("a", a), ("b", b), ("broken", broken))}


@pytest.fixture(scope="module")
def image_bytes() -> bytes:
    return png_bytes(make_image(11))


def segment(server: ApiServer, image: bytes, adapter: str = "live") -> tuple[str, np.ndarray]:
    """The version a segmentation reports (body and header agree) and its low-res logits."""
    with server.client() as client:
        response = client.post("/v1/segment", json={
            "image_base64": base64.b64encode(image).decode(), "box": BOX, "multimask": False,
            "adapter": adapter, "return_logits": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["X-Regcl-Adapter-Version"] == body["adapter_version"]
    logits = np.frombuffer(base64.b64decode(body["masks"][0]["low_res_logits"]), dtype="<f4")
    return body["adapter_version"], logits


def activate(server: ApiServer, number: int, key: str | None = ADMIN_KEY):
    with server.client(key) as client:
        return client.post(f"/v1/versions/{number}/activate")


def test_activation_hot_swaps_and_rolls_back(server, versions, image_bytes):
    a, b = versions["a"], versions["b"]
    with server.client() as client:
        listed = client.get("/v1/versions").json()
        assert [v["number"] for v in listed["versions"]] == [a, b, versions["broken"]]
        assert listed["live_version"] is None
        assert client.get(f"/v1/versions/{a}").json()["lineage"] == {"domains": ["a"]}
        assert_problem(client.get("/v1/versions/999"), 404, "not-found")
        live = client.get("/v1/versions/live").json()
        assert live["live_version"] is None and live["adapter_version"] == "base"

    label, base = segment(server, image_bytes)
    assert label == "base"
    assert_problem(activate(server, a, key=None), 401, "unauthorized")

    response = activate(server, a)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"]["number"] == a and body["version"]["live"] is True
    assert body["previous_version"] is None and body["served_version"] == a
    label, logits_a = segment(server, image_bytes)
    assert label == f"live:{a}"
    assert not np.allclose(logits_a, base)
    label, again_base = segment(server, image_bytes, adapter="base")
    assert label == "base" and np.array_equal(again_base, base)

    assert activate(server, b).json()["served_version"] == b
    label, logits_b = segment(server, image_bytes)
    assert label == f"live:{b}" and not np.allclose(logits_b, logits_a)

    rollback = activate(server, a).json()  # rolling back is activating an older version
    assert rollback["previous_version"] == b and rollback["served_version"] == a
    label, logits = segment(server, image_bytes)
    assert label == f"live:{a}"
    np.testing.assert_allclose(logits, logits_a, rtol=0, atol=1e-5)


def test_a_version_that_does_not_fit_is_refused_and_changes_nothing(server, versions,
                                                                    image_bytes):
    with server.client() as client:
        before = client.get("/v1/versions/live").json()
    assert_problem(activate(server, versions["broken"]), 422, "adapter-rejected")
    assert_problem(activate(server, 999), 404, "not-found")
    with server.client() as client:
        assert client.get("/v1/versions/live").json() == before
    assert segment(server, image_bytes)[0] == f"live:{before['served_version']}"


def _wait_served(server: ApiServer, number: int, timeout_s: float = 120.0) -> None:
    with server.api() as api:
        api.wait_served(number, timeout_s)


def test_follows_the_pointer_moved_by_another_process(server, registry, versions,
                                                      image_bytes):
    b = versions["b"]
    registry.activate(b)  # as a merge job with activate=True does
    _wait_served(server, b)
    assert segment(server, image_bytes)[0] == f"live:{b}"
    with server.client() as client:
        metrics = client.get("/metrics").text
    assert f"regcl_live_version {float(b)}" in metrics
    count = [line for line in metrics.splitlines()
             if line.startswith("regcl_adapter_swap_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 4
    failures = [line for line in metrics.splitlines()
                if line.startswith("regcl_adapter_swap_failures_total")]
    assert failures and float(failures[0].split()[-1]) == 0


def test_no_request_fails_during_swaps(server, versions, image_bytes):
    a, b = versions["a"], versions["b"]
    with server.client() as client:
        image_id = client.post("/v1/images", files={"file": ("x.png", image_bytes,
                                                             "image/png")}).json()["image_id"]
    stop = threading.Event()
    results: list[tuple[int, str]] = []

    def hammer() -> None:
        with server.client() as client:
            while not stop.is_set():
                response = client.post("/v1/segment", json={"image_id": image_id, "box": BOX})
                results.append((response.status_code,
                                response.headers.get("X-Regcl-Adapter-Version", "")))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for number in (a, b, a, b):
            assert activate(server, number).status_code == 200
            time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert len(results) >= 4
    assert all(status == 200 for status, _ in results), results
    assert {label for _, label in results} <= {f"live:{a}", f"live:{b}"}


def test_restarted_server_serves_the_live_version(server, registry, versions, image_bytes):
    b = versions["b"]
    assert registry.live_version() == b
    _, before = segment(server, image_bytes)
    server.stop(kill=True)
    server.start()
    with server.client() as client:  # served from the first request on, no waiting
        live = client.get("/v1/versions/live").json()
        assert live["served_version"] == b and live["adapter_version"] == f"live:{b}"
    label, after = segment(server, image_bytes)
    assert label == f"live:{b}"
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)



def test_continual_matrix_reads_the_newest_evaluations(server, redis_url, registry, versions):
    """GET /v1/versions/matrix: one row per evaluated model (base, versions by number,
    adapters), one column per dataset, the newest succeeded evaluation winning; failed jobs
    and malformed results are left out."""
    client = connect(redis_url)
    jobs = JobStore(client)

    def evaluation(target: str, metrics: dict, ok: bool = True) -> str:
        job_id = jobs.create("evaluate", {"target": target})
        jobs.mark_running(job_id)
        if ok:
            jobs.succeed(job_id, {"target": target, "metrics": metrics})
        else:
            jobs.fail(job_id, "DataError", "no data")
        return job_id

    a, b = versions["a"], versions["b"]
    scores = {"iou": 0.5, "dice": 0.6, "mae": 0.1, "count": 4}
    evaluation("base", {"polyp-data": {**scores, "iou": 0.4}})
    evaluation(f"version:{a}", {"polyp-data": {**scores, "iou": 0.55}})
    newest = evaluation(f"version:{a}", {"polyp-data": scores, "shadow-data": scores})
    evaluation(f"version:{b}", {"polyp-data": {**scores, "iou": 0.9}}, ok=False)
    evaluation(f"version:{b}", {"shadow-data": {**scores, "iou": 0.7}})
    evaluation("adapter:polyp", {"polyp-data": {**scores, "iou": 0.65}})
    evaluation("nonsense", {"polyp-data": scores})
    evaluation("base", {"polyp-data": {"dice": 0.3}})  # no IoU: no cell
    client.close()

    with server.client() as anon:
        response = anon.get("/v1/versions/matrix")
        assert response.status_code == 200, response.text
        body = response.json()
        assert [c["dataset"] for c in body["columns"]] == ["polyp-data", "shadow-data"]
        rows = {row["target"]: row for row in body["rows"]}
        assert [row["target"] for row in body["rows"]] == [
            "base", f"version:{a}", f"version:{b}", "adapter:polyp"]
        assert rows["base"]["scores"]["polyp-data"]["iou"] == 0.4
        assert rows[f"version:{a}"]["version"] == a
        assert rows[f"version:{a}"]["scores"]["polyp-data"]["iou"] == 0.5  # the newest
        assert rows[f"version:{a}"]["scores"]["polyp-data"]["job_id"] == newest
        assert rows[f"version:{a}"]["scores"]["shadow-data"]["count"] == 4
        assert rows[f"version:{b}"]["scores"] == {
            "shadow-data": {**rows[f"version:{b}"]["scores"]["shadow-data"], "iou": 0.7}}
        assert rows["adapter:polyp"]["adapter"] == "polyp"
        assert body["live_version"] in (None, a, b)
        assert [r["live"] for r in body["rows"]] == [
            r["version"] is not None and r["version"] == body["live_version"]
            for r in body["rows"]]
        assert body["jobs_scanned"] == 7
        assert_problem(anon.get("/v1/versions/matrix", params={"limit": 0}), 422,
                       "validation-error")
        one = anon.get("/v1/versions/matrix", params={"limit": 1}).json()
        assert one["rows"] == [] and one["jobs_scanned"] == 1
