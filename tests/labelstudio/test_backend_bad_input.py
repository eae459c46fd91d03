"""Bad input to /labelstudio: each case answers a clear 4xx (or 502 for a Label Studio that
does not answer) problem with its stable type, and changes NOTHING stored (HTTP listings,
every Redis key, every file under the server's data directory), checked against a store
that already holds a project's sample set."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import redis

from infra.redis_client import connect
from tests.badinput.bad_support import Store
from tests.labelstudio.conftest import MAX_IMAGE_BYTES
from tests.labelstudio.file_origin import FileOrigin
from tests.labelstudio.ls_support import (
    LABEL_CONFIG,
    annotation_event,
    brush_region,
    keypoint,
    predict_body,
    project_event,
    rectangle,
    task,
)
from tests.service.api_support import ADMIN_KEY, ApiServer, assert_problem, make_image, png_bytes

PROJECT = 70
HEIGHT, WIDTH = 48, 64


@pytest.fixture(scope="module")
def good(ls_api: ApiServer, origin: FileOrigin) -> dict[str, object]:
    """A project that already has a stored annotation; good image paths and a good mask."""
    paths = {name: origin.add(f"/data/upload/{PROJECT}/{name}.png",
                              png_bytes(make_image(seed, HEIGHT, WIDTH)))
             for seed, name in enumerate(("seed", "other"))}
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[8:30, 10:40] = True
    with httpx.Client(base_url=ls_api.url, auth=("ls", ADMIN_KEY), timeout=120) as admin:
        stored = admin.post("/labelstudio/webhook", json=annotation_event(
            "ANNOTATION_CREATED", PROJECT, 700, 7000, paths["seed"], [brush_region(mask)]))
        assert stored.status_code == 200 and stored.json()["samples"] == 1, stored.text
    origin.add("/data/upload/x/corrupt.png", b"\x89PNG\r\n\x1a\nnot really a png" * 10)
    origin.add("/data/upload/x/big.png", b"\0" * (MAX_IMAGE_BYTES + 1))
    origin.add("/data/upload/x/big-chunked.png", b"\0" * (MAX_IMAGE_BYTES + 4096),
               chunked=True)
    origin.add("/data/upload/x/slow.png", png_bytes(make_image(1, HEIGHT, WIDTH)),
               drip_s=1.5)
    origin.add("/data/upload/x/to-elsewhere.png", b"", status=302,
               headers={"Location": "http://169.254.169.254/latest/meta-data/"})
    origin.add("/data/upload/x/bad-location.png", b"", status=302,
               headers={"Location": "http://[::1"})
    origin.add("/data/upload/x/loop.png", b"", status=302,
               headers={"Location": "/data/upload/x/loop.png"})
    origin.add("/data/upload/x/broken.png", b"oops", status=500)
    return {**paths, "mask": mask}


@pytest.fixture
def store(ls_api: ApiServer, good: dict[str, object]) -> Iterator[Store]:
    client: redis.Redis = connect(ls_api.env["REGCL_REDIS_URL"])
    yield Store(ls_api, client)
    client.close()


@pytest.fixture
def admin(ls_api: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ls_api.url, auth=("ls", ADMIN_KEY), timeout=120) as client:
        yield client


def _predict(client: httpx.Client, url: str, regions: list[dict] | None = None,
             **body: object) -> httpx.Response:
    payload = predict_body([task(1, url)], regions or [keypoint(50, 50)])
    return client.post("/labelstudio/predict", json={**payload, **body})


# -- predict ----------------------------------------------------------------------------------

@pytest.mark.parametrize("regions, status, code", [
    ([{"type": "polygonlabels", "value": {"points": [[1, 2]], "polygonlabels": ["x"]}}],
     422, "unsupported-result-type"),
    ([keypoint(150.0, 20.0)], 422, "out-of-bounds"),
    ([keypoint(20.0, -0.5)], 422, "out-of-bounds"),
    ([rectangle(80.0, 10.0, 30.0, 10.0)], 422, "out-of-bounds"),
    ([{"type": "keypointlabels", "value": {"x": "NaN", "y": 3}}], 422, "invalid-region"),
    ([{"type": "keypointlabels", "value": {"x": 1, "y": 3}, "is_positive": "yes"}], 422,
     "invalid-region"),
    ([{"type": "rectanglelabels", "value": {"x": 1, "y": 3, "width": 5, "height": 5,
                                            "rotation": 30}}], 422, "invalid-region"),
    (["not a region"], 422, "invalid-region"),
])
def test_predict_refuses_bad_prompts(store: Store, admin: httpx.Client, good: dict,
                                     regions: list, status: int, code: str) -> None:
    with store.unchanged():
        assert_problem(_predict(admin, good["other"], regions), status, code)


@pytest.mark.parametrize("config", [
    "<View><Image name='image' value='$image'/></View>",  # no BrushLabels
    "<View><BrushLabels name='m' toName='nothing'/></View>",  # its image is missing
    "<View><Image",  # not XML
    '<!DOCTYPE x [<!ENTITY a "aaaa">]><View>&a;</View>',  # entity declarations
])
def test_predict_refuses_bad_label_configs(store: Store, admin: httpx.Client, good: dict,
                                           config: str) -> None:
    with store.unchanged():
        assert_problem(_predict(admin, good["other"], label_config=config), 422,
                       "invalid-label-config")


@pytest.mark.parametrize("url, status, code", [
    ("http://169.254.169.254/latest/meta-data/", 422, "foreign-image-url"),
    ("http://ls@127.0.0.2/data/upload/1/a.png", 422, "foreign-image-url"),
    ("file:///etc/passwd", 422, "foreign-image-url"),
    ("/data/upload/x/to-elsewhere.png", 422, "storage-host-refused"),
    ("/data/upload/x/bad-location.png", 502, "label-studio-unreachable"),
    ("/data/upload/x/loop.png", 422, "image-unavailable"),
    ("/data/upload/x/missing.png", 422, "image-unavailable"),
    ("/data/upload/x/corrupt.png", 422, "invalid-image"),
    ("/data/upload/x/big.png", 422, "image-too-large"),
    ("/data/upload/x/big-chunked.png", 422, "image-too-large"),
    ("/data/upload/x/slow.png", 502, "label-studio-unreachable"),
    ("/data/upload/x/broken.png", 502, "label-studio-unreachable"),
])
def test_predict_refuses_bad_images(store: Store, admin: httpx.Client, origin: FileOrigin,
                                    url: str, status: int, code: str) -> None:
    before = len(origin.requests)
    with store.unchanged():
        assert_problem(_predict(admin, url), status, code)
    if code == "foreign-image-url" and url.startswith(("http", "file")):
        assert len(origin.requests) == before  # refused before any request
    assert all(path.startswith("/data/") for path, _ in origin.requests[before:])


def test_predict_refuses_malformed_bodies(store: Store, admin: httpx.Client) -> None:
    with store.unchanged():
        assert_problem(admin.post("/labelstudio/predict", json={"tasks": []}), 422,
                       "validation-error")
        assert_problem(admin.post("/labelstudio/predict", content=b"{",
                                  headers={"content-type": "application/json"}), 422,
                       "validation-error")
        assert_problem(_predict(admin, "/x", params={"context": "nope"}), 422,
                       "validation-error")


# -- webhooks ---------------------------------------------------------------------------------

def _event(good: dict, regions: list[dict], url: str | None = None, **changes: object
           ) -> dict:
    event = annotation_event("ANNOTATION_CREATED", PROJECT, 701, 7001,
                             url or good["other"], regions)
    event.update(changes)
    return event


def _polygon(points: object) -> dict:
    return {"type": "polygonlabels", "from_name": "poly", "to_name": "image",
            "original_width": WIDTH, "original_height": HEIGHT,
            "value": {"points": points, "polygonlabels": ["object"], "closed": True}}


def _bulk(good: dict, results: list[list[dict]]) -> dict:
    """An ANNOTATIONS_CREATED webhook: one annotation per result list, each on its own
    task (all showing the good image)."""
    events = [annotation_event("ANNOTATIONS_CREATED", PROJECT, 710 + i, 7100 + i,
                               good["other"], regions) for i, regions in enumerate(results)]
    return {"action": "ANNOTATIONS_CREATED", "project": events[0]["project"],
            "annotation": [e["annotation"] for e in events], "task": [e["task"] for e in events]}


def test_webhook_refuses_bad_annotations(store: Store, admin: httpx.Client,
                                         good: dict) -> None:
    mask = good["mask"]
    region = brush_region(mask)
    cases = [
        (_event(good, [region], annotation=None), "invalid-payload"),
        (_event(good, [region], task="no task"), "invalid-payload"),
        (_event(good, [region], project=None), "invalid-payload"),
        ({**_event(good, [region]), "annotation": {"id": "701", "result": []}},
         "invalid-payload"),
        (_event(good, [{**region, "type": "ellipselabels"}]), "unsupported-result-type"),
        (_event(good, [{**region, "type": "polygonlabels"}]), "invalid-region"),
        (_event(good, [{**region, "value": {**region["value"], "format": "png"}}]),
         "invalid-region"),
        (_event(good, [brush_region(mask, rle=[1, 2, 3])]), "invalid-brush-rle"),
        (_event(good, [brush_region(mask, rle=region["value"]["rle"][:-6])]),
         "invalid-brush-rle"),
        (_event(good, [{**region, "original_width": WIDTH + 1}]), "invalid-brush-rle"),
        (_event(good, [brush_region(np.ones((HEIGHT + 2, WIDTH), dtype=bool))]),
         "invalid-brush-rle"),  # decodes, but the image is another size
        (_event(good, [{**region, "original_width": 10**6, "original_height": 10**6}]),
         "invalid-brush-rle"),
        (_event(good, [region], url="http://elsewhere.example/a.png"), "foreign-image-url"),
        (_event(good, [region], url="/data/upload/x/corrupt.png"), "invalid-image"),
        (_event(good, [region], url="/data/upload/x/big.png"), "image-too-large"),
        ({**_event(good, [region]), "project": {"id": PROJECT, "label_config": "<View/>"}},
         "invalid-label-config"),
        # malformed polygons
        *[(_event(good, [_polygon(points)]), "invalid-region") for points in (
            [[10, 10], [50, 10]], [[10, 10], [50, 10], [50, float("nan")]],
            [[10, 10], [50, 10], [50, 150]], [[10, 10], [50, 10], [50]], "10,10 50,10 50,50",
            [[10, 10], [50, 10], [50, "50"]], [[0, 0]] * 10_001)],
        # ANNOTATIONS_CREATED: every annotation is checked before any is stored
        ({**_event(good, [region]), "action": "ANNOTATIONS_CREATED"}, "invalid-payload"),
        (_bulk(good, [[region], [_polygon([[10, 10], [50, 10]])]]), "invalid-region"),
        (_bulk(good, [[region], [{**region, "type": "ellipselabels"}]]),
         "unsupported-result-type"),
    ]
    for event, code in cases:
        with store.unchanged():  # json.dumps writes NaN as Label Studio's JavaScript would not
            assert_problem(admin.post("/labelstudio/webhook", content=json.dumps(event),
                                      headers={"Content-Type": "application/json"}), 422, code)


def test_state_changing_routes_need_the_key(store: Store, ls_api: ApiServer,
                                            good: dict) -> None:
    event = _event(good, [brush_region(good["mask"])])
    setup = {"project": f"{PROJECT}.1", "extra_params": {"domain": "stolen"}}
    bodies = [("/labelstudio/webhook", event),
              ("/labelstudio/webhook", project_event("START_TRAINING", PROJECT)),
              ("/labelstudio/webhook", project_event("ANNOTATIONS_DELETED", PROJECT,
                                                     annotations=[{"id": 700}])),
              ("/labelstudio/train", {"project": f"{PROJECT}.1"}),
              ("/labelstudio/setup", setup)]
    auths: list[httpx.Auth | None] = [None, httpx.BasicAuth("ls", "wrong-key-0123456789"),
                                      httpx.BasicAuth(ADMIN_KEY, "")]
    for auth in auths:
        with httpx.Client(base_url=ls_api.url, auth=auth, timeout=60) as client:
            for path, body in bodies:
                with store.unchanged():
                    assert_problem(client.post(path, json=body), 401, "unauthorized")
    with httpx.Client(base_url=ls_api.url, timeout=60,
                      headers={"Authorization": "Basic !!not-base64!!"}) as client, \
            store.unchanged():
        assert_problem(client.post("/labelstudio/webhook", json=event), 401, "unauthorized")


def test_training_an_empty_project_is_refused(store: Store, admin: httpx.Client) -> None:
    with store.unchanged():
        assert_problem(admin.post("/labelstudio/train", json={"project": "71.1"}), 409,
                       "not-enough-samples")
        assert_problem(admin.post("/labelstudio/train", json={"project": "seventy"}), 422,
                       "validation-error")  # the schema's pattern (the OpenAPI states it)


def test_setup_refuses_bad_extra_params(store: Store, admin: httpx.Client) -> None:
    for extra in ({"domain": "Not A Name"}, {"train": {"rank": 0}}, {"holdout": 2},
                  {"unknown": 1}, "not json", ["a"]):
        with store.unchanged():
            response = admin.post("/labelstudio/setup", json={
                "project": f"{PROJECT}.1", "schema": LABEL_CONFIG, "extra_params": extra})
            assert response.status_code == 422, (extra, response.text)
