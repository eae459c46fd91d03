"""Pre-encoding a Label Studio project (issue #22, "no wait on the first click"), on two real
API processes that share one Redis database and one artifact store, with a real HTTP server
as Label Studio (its project and paged task-list API, and the task images): a task encoded
ahead is served to the OTHER process from the store, without a fetch or an encode, with the
mask the cold path gives; the byte budget stops the job; a cancel stops it; setup starts it;
a live swap starts it again with the new version; a project given its own adapter by a step
is pre-encoded again with that adapter."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from infra.artifacts import ArtifactStore
from infra.project_serving import ProjectServing, ServingCheck
from infra.redis_client import connect
from infra.redis_server import RedisServer
from infra.registry import Registry
from regcl.client import Client
from service.engine import image_id_of
from service.labelstudio.brush_rle import decode_brush_rle
from tests import databases
from tests.labelstudio.file_origin import TOKEN, FileOrigin
from tests.labelstudio.ls_support import LABEL_CONFIG, keypoint, predict_body, task
from tests.service.api_support import (
    ADMIN_KEY,
    ApiServer,
    assert_problem,
    make_adapter,
    make_image,
    png_bytes,
)

EMBEDDING = 128 * 16 * 16 * 2  # the tiny SAM's embedding in float16
BUDGET = 2 * (EMBEDDING + 2048) + 1000  # two embeddings, not three


@pytest.fixture(scope="module")
def pair(redis_server: RedisServer, origin: FileOrigin,
         start_api: Callable[..., ApiServer],
         tmp_path_factory: pytest.TempPathFactory) -> tuple[ApiServer, ApiServer]:
    """Two API processes on one Redis database and one artifact store; the second's byte
    budget holds two tiny embeddings."""
    started = time.perf_counter()
    redis_url = databases.emptied(redis_server, databases.LABELSTUDIO_PREENCODE)
    artifacts = str(tmp_path_factory.mktemp("shared") / "artifacts")
    common = {"REGCL_LABEL_STUDIO_URL": origin.url, "REGCL_LABEL_STUDIO_API_KEY": TOKEN,
              "REGCL_ARTIFACT_URL": artifacts}
    first = start_api(redis_url, **common)
    second = start_api(redis_url, **common,
                       REGCL_LABEL_STUDIO_PREENCODE_MAX_BYTES=str(BUDGET))
    print(f"two API processes started in {time.perf_counter() - started:.1f} s")
    return first, second


def _admin(server: ApiServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=120.0,
                        auth=httpx.BasicAuth("labelstudio", ADMIN_KEY))


@pytest.fixture
def admins(pair: tuple[ApiServer, ApiServer]) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    with _admin(pair[0]) as first, _admin(pair[1]) as second:
        yield first, second


def _metric(client: httpx.Client, name: str) -> float:
    (line,) = [x for x in client.get("/metrics").text.splitlines()
               if x.startswith(f"{name}_total ")]
    return float(line.split()[1])


def _tasks(origin: FileOrigin, project: int, count: int, annotated: tuple[int, ...] = (),
           **route: object) -> list[dict]:
    tasks = []
    for n in range(count):
        path = origin.add(f"/data/upload/{project}/t{n}.png",
                          png_bytes(make_image(100 * project + n)), **route)
        tasks.append({**task(1000 * project + n, path),
                      "total_annotations": int(n in annotated)})
    origin.add_project(project, LABEL_CONFIG, tasks)
    return tasks


def _wait(client: httpx.Client, project: int, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(f"/labelstudio/preencode/{project}").json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def _mask(client: httpx.Client, tasks: list[dict], project: int) -> np.ndarray:
    answer = client.post("/labelstudio/predict", json=predict_body(
        tasks, [keypoint(40.0, 55.0)], project=project))
    assert answer.status_code == 200, answer.text
    (prediction,) = answer.json()["results"]
    (region,) = prediction["result"]
    return decode_brush_rle(region["value"]["rle"], region["original_height"],
                            region["original_width"])


def test_a_preencoded_task_is_served_from_the_store_by_another_process(
        pair: tuple[ApiServer, ApiServer], admins: tuple[httpx.Client, httpx.Client],
        origin: FileOrigin) -> None:
    started = time.perf_counter()
    first, second = admins
    tasks = _tasks(origin, 77, 3, annotated=(1,))
    queued = first.post("/labelstudio/preencode", json={"project": "77.1712345678"})
    assert queued.status_code == 202, queued.text
    assert queued.json()["status"] in ("queued", "running")
    assert queued.json()["version"] == "base"
    done = _wait(first, 77)
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert {k: result[k] for k in ("tasks", "annotated", "encoded", "written", "stored",
                                   "failed", "stopped")} == {
        "tasks": 3, "annotated": 1, "encoded": 2, "written": 2, "stored": 2, "failed": 0,
        "stopped": None}
    assert 2 * EMBEDDING < result["bytes"] < 2 * (EMBEDDING + 2048)
    fetches = origin.fetched(tasks[0]["data"]["image"])
    assert fetches == 1 and origin.fetched(tasks[1]["data"]["image"]) == 0  # annotated: skipped

    # The second process never saw the image: its first click reads the store.
    encodes = _metric(second, "regcl_image_encodes")
    loads = _metric(second, "regcl_embedding_store_loads")
    stored = _mask(second, [tasks[0]], 77)
    assert _metric(second, "regcl_image_encodes") == encodes  # no encode ...
    assert _metric(second, "regcl_embedding_store_loads") == loads + 1  # ... the store's
    assert origin.fetched(tasks[0]["data"]["image"]) == fetches  # and no fetch either
    # The cold path: the first process's own float32 encode (cached since it pre-encoded)
    cold = _mask(first, [tasks[0]], 77)
    assert stored.any() and np.array_equal(stored, cold)
    # The same click again in the second process: its cache, not the store
    assert np.array_equal(_mask(second, [tasks[0]], 77), stored)
    assert _metric(second, "regcl_embedding_store_loads") == loads + 1

    # Setup starts a pre-encode; this one finds both embeddings in the store
    setup = second.post("/labelstudio/setup", json={"project": "77.1712345678"})
    assert setup.status_code == 200 and setup.json()["preencode_job"], setup.text
    again = _wait(second, 77)["result"]
    assert (again["stored"], again["written"], again["encoded"]) == (2, 0, 0), again
    assert origin.fetched(tasks[0]["data"]["image"]) == fetches  # known from the record
    print(f"store served, setup found it stored: {time.perf_counter() - started:.1f} s")


def test_the_byte_budget_stops_it(admins: tuple[httpx.Client, httpx.Client],
                                  origin: FileOrigin) -> None:
    started = time.perf_counter()
    _, second = admins
    _tasks(origin, 78, 4)
    assert second.post("/labelstudio/preencode", json={"project": 78}).status_code == 202
    result = _wait(second, 78)["result"]
    assert (result["stored"], result["tasks"], result["stopped"]) == (2, 3, "budget"), result
    assert result["bytes"] <= BUDGET == result["budget"]
    print(f"budget: {time.perf_counter() - started:.1f} s")


def test_cancel_stops_it_and_bad_requests_are_problems(
        admins: tuple[httpx.Client, httpx.Client], origin: FileOrigin,
        pair: tuple[ApiServer, ApiServer]) -> None:
    started = time.perf_counter()
    first, _ = admins
    _tasks(origin, 79, 12, drip_s=0.02)  # ~0.3 s per image fetch
    assert first.post("/labelstudio/preencode", json={"project": 79}).status_code == 202
    time.sleep(0.5)
    cancelled = first.delete("/labelstudio/preencode/79")
    assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"], cancelled.text
    done = _wait(first, 79)
    assert done["status"] == "cancelled" and done["detail"]["tasks"] < 12, done
    assert_problem(first.delete("/labelstudio/preencode/79"), 404, "no-preencode")
    assert_problem(first.get("/labelstudio/preencode/80"), 404, "no-preencode")
    assert_problem(first.post("/labelstudio/preencode", json={"project": 79,
                                                              "adapter": "auto"}),
                   422, "preencode-adapter")
    assert_problem(first.post("/labelstudio/preencode", json={"project": 79,
                                                              "adapter": "nope"}),
                   404, "unknown-adapter")
    with httpx.Client(base_url=pair[0].url) as anon:
        assert_problem(anon.post("/labelstudio/preencode", json={"project": 79}), 401,
                       "unauthorized")
    print(f"cancel and problems: {time.perf_counter() - started:.1f} s")


def test_a_live_swap_preencodes_again_with_the_new_version(
        pair: tuple[ApiServer, ApiServer], admins: tuple[httpx.Client, httpx.Client],
        redis_server: RedisServer, origin: FileOrigin, tmp_path: Path) -> None:
    """Runs after the tests above: project 77 was pre-encoded with ``live`` while it meant
    the base model."""
    started = time.perf_counter()
    tasks = origin.projects[77][1]
    store = ArtifactStore(pair[0].env["REGCL_ARTIFACT_URL"])
    client = connect(databases.database_url(redis_server, databases.LABELSTUDIO_PREENCODE))
    try:
        registry = Registry(client, store)
        save_file({"step": torch.zeros(1)}, str(tmp_path / "state.safetensors"))
        live = registry.create_version(make_adapter(tmp_path / "live", seed=9, stats=False),
                                       tmp_path / "state.safetensors").number
        registry.activate(live)
    finally:
        client.close()
    deadline = time.monotonic() + 60
    for admin in admins:  # both processes swap, and their listeners start project 77 again
        while admin.get("/labelstudio/health").json()["model_version"] != f"live:{live}":
            assert time.monotonic() < deadline, "the live version never came"
            time.sleep(0.1)
    while True:
        body = admins[0].get("/labelstudio/preencode/77").json()
        if body["version"] == f"live:{live}" and body["status"] == "succeeded":
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    assert body["result"]["stored"] == 2 and body["result"]["versions"] == [f"live:{live}"]
    stored = {p.name for p in Path(store.url).glob(f"embeddings/*/live-{live}/*.npz")}
    ours = {f"{image_id_of(make_image(100 * 77 + n))}.npz" for n in range(3)}
    assert stored & ours == ours - {f"{image_id_of(make_image(100 * 77 + 1))}.npz"}
    for project in (78, 79):  # also pre-encoded with live; stopped, so nothing else encodes
        while admins[0].get(f"/labelstudio/preencode/{project}").json()["version"] != \
                f"live:{live}":
            assert time.monotonic() < deadline, project
            time.sleep(0.1)
        admins[0].delete(f"/labelstudio/preencode/{project}")  # 404 if it has finished
        _wait(admins[0], project)
    # A click in either process: live's embedding, from the cache or the store, no encode
    encodes = sum(_metric(admin, "regcl_image_encodes") for admin in admins)
    for admin in admins:
        answer = admin.post("/labelstudio/predict", json=predict_body(
            [tasks[0]], [keypoint(40.0, 55.0)], project=77))
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["model_version"] == f"live:{live}"
    assert sum(_metric(admin, "regcl_image_encodes") for admin in admins) == encodes
    print(f"live swap, pre-encoded again: {time.perf_counter() - started:.1f} s")


def test_a_project_given_its_own_adapter_is_preencoded_with_it(
        pair: tuple[ApiServer, ApiServer], admins: tuple[httpx.Client, httpx.Client],
        redis_server: RedisServer, origin: FileOrigin, tmp_path: Path) -> None:
    """Per-project serving: once a continual step made ``ls-81-s1`` the project's adapter
    (the record written here as the worker writes it), the project's next predict starts its
    pre-encode again with that adapter, and the other process's first click on another task
    then encodes nothing."""
    started = time.perf_counter()
    first, second = admins
    tasks = _tasks(origin, 81, 2)
    assert first.post("/labelstudio/preencode", json={"project": 81}).status_code == 202
    assert _wait(first, 81)["adapter"] == "live"
    with Client(pair[0].url, ADMIN_KEY) as admin:
        info = admin.upload_adapter("ls-81-s1", make_adapter(tmp_path / "own", seed=81),
                                    domain="ls-81")
    client = connect(databases.database_url(redis_server, databases.LABELSTUDIO_PREENCODE))
    try:
        ProjectServing(client).record("ls-81", ServingCheck(
            "ls-81-s1", info.sha256, 0.8, "base", 0.5, 2, job_id="step"))
    finally:
        client.close()
    own = f"domain:ls-81-s1@{info.sha256[:8]}"
    answer = first.post("/labelstudio/predict", json=predict_body(
        [tasks[0]], [keypoint(40.0, 55.0)], project=81))
    assert answer.status_code == 200 and answer.json()["results"][0]["model_version"] == own
    deadline = time.monotonic() + 60
    while (body := first.get("/labelstudio/preencode/81").json())["adapter"] != "ls-81-s1" \
            or body["status"] != "succeeded":
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    assert body["result"]["stored"] == 2, body
    encodes = _metric(second, "regcl_image_encodes")
    answer = second.post("/labelstudio/predict", json=predict_body(
        [tasks[1]], [keypoint(40.0, 55.0)], project=81))
    assert answer.status_code == 200 and answer.json()["results"][0]["model_version"] == own
    assert _metric(second, "regcl_image_encodes") == encodes
    print(f"own adapter, pre-encoded with it: {time.perf_counter() - started:.1f} s")
