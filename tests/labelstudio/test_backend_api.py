"""The /labelstudio routes on the real API server, with a real HTTP server as Label Studio's
file origin: health and setup, interactive predictions equal to /v1/segment pixel for pixel
(a session's next click with its previous mask fed back as ``mask_input``),
annotations into the project's sample set (created, updated, deleted), training triggers."""

from __future__ import annotations

import httpx
import numpy as np
import redis

from infra import keys
from infra.jobs import JobStore
from infra.sample_sets import SampleSets
from regcl.client import Client
from service.labelstudio.brush_rle import decode_brush_rle
from tests.labelstudio.conftest import TRAIN_EVERY
from tests.labelstudio.file_origin import TOKEN, FileOrigin
from tests.labelstudio.ls_support import (
    annotation_event,
    brush_region,
    keypoint,
    predict_body,
    project_event,
    rectangle,
    task,
)
from tests.service.api_support import ApiServer, assert_problem, make_image, png_bytes


def _image(origin: FileOrigin, name: str, seed: int, height: int = 96, width: int = 128
           ) -> tuple[str, np.ndarray, bytes]:
    array = make_image(seed, height, width)
    data = png_bytes(array)
    return origin.add(f"/data/upload/1/{name}.png", data), array, data


def test_health_and_root(ls_anon: httpx.Client) -> None:
    for path in ("/labelstudio/health", "/labelstudio/"):
        response = ls_anon.get(path)
        assert response.status_code == 200, response.text
        body = response.json()
        assert {k: body[k] for k in ("status", "model_class", "model_version")} == {
            "status": "UP", "model_class": "regcl", "model_version": "base"}
        assert body["label_studio"]["token"] == "legacy-token"
        assert body["label_studio"]["url"].startswith("http://127.0.0.1:")
    assert TOKEN not in response.text  # never shown


def test_setup_answers_the_version_and_stores_extra_params_only_with_the_key(
        ls_anon: httpx.Client, ls_admin: httpx.Client, ls_redis: redis.Redis) -> None:
    body = {"project": "31.1712345678", "schema": "<View/>", "hostname": "http://ls",
            "access_token": "secret-token-of-the-project-owner"}
    answer = ls_anon.post("/labelstudio/setup", json=body)
    assert answer.status_code == 200, answer.text
    # a pre-encode starts too (it fails here: this Label Studio has no project 31)
    answered = answer.json()
    assert answered.pop("preencode_job") and answered == {"model_version": "base",
                                                          "domain": "ls-31", "sync_job": None}
    extra = {"domain": "endoscopy-31", "train": {"epochs": 2, "rank": 4}}
    refused = ls_anon.post("/labelstudio/setup", json={**body, "extra_params": extra})
    assert_problem(refused, 401, "unauthorized")
    assert ls_redis.hget(keys.LS_PROJECTS, "31") is None
    bad = ls_admin.post("/labelstudio/setup", json={**body, "extra_params": {
        "train": {"epochs": 0}}})
    assert_problem(bad, 422, "invalid-argument")
    assert ls_redis.hget(keys.LS_PROJECTS, "31") is None
    done = ls_admin.post("/labelstudio/setup", json={**body, "extra_params": extra})
    assert done.status_code == 200 and done.json()["domain"] == "endoscopy-31"
    assert ls_anon.post("/labelstudio/setup", json=body).json()["domain"] == "endoscopy-31"
    assert "secret-token" not in "".join(ls_redis.hvals(keys.LS_PROJECTS))


def test_a_click_without_a_remembered_session_decodes_from_its_points(
        ls_anon: httpx.Client, origin: FileOrigin, ls_api: ApiServer) -> None:
    path, _, data = _image(origin, "no-session", seed=5)
    regions = [keypoint(40.0, 55.0), keypoint(80.5, 12.25, positive=False)]
    answer = ls_anon.post("/labelstudio/predict", json=predict_body([task(8, path)], regions))
    assert answer.status_code == 200, answer.text
    (region,) = answer.json()["results"][0]["result"]
    mask = decode_brush_rle(region["value"]["rle"], 96, 128)
    with Client(ls_api.url) as regcl:
        alone = regcl.segment(data, multimask=False, points=[[51.2, 52.8], [103.04, 11.76]],
                              labels=[1, 0])
    np.testing.assert_array_equal(mask, alone.masks[0].mask)


def test_interactive_prediction_equals_v1_segment(ls_api: ApiServer, ls_anon: httpx.Client,
                                                  origin: FileOrigin) -> None:
    path, array, data = _image(origin, "parity", seed=3)
    height, width = array.shape[:2]
    cases = [
        ([keypoint(40.0, 55.0)], {"points": [[51.2, 52.8]], "labels": [1]}),
        ([keypoint(40.0, 55.0), keypoint(80.5, 12.25, positive=False)],
         {"points": [[51.2, 52.8], [103.04, 11.76]], "labels": [1, 0]}),
        ([rectangle(10.0, 20.0, 50.0, 40.0)], {"box": [12.8, 19.2, 76.8, 57.6]}),
    ]
    with Client(ls_api.url) as regcl:
        encodes = _encodes(regcl)
        previous = None
        for regions, prompt in cases:
            answer = ls_anon.post("/labelstudio/predict",
                                  json=predict_body([task(7, path)], regions))
            assert answer.status_code == 200, answer.text
            (prediction,) = answer.json()["results"]
            (region,) = prediction["result"]
            assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
            assert (region["from_name"], region["to_name"]) == ("mask", "image")
            assert (region["original_width"], region["original_height"]) == (width, height)
            assert region["value"]["brushlabels"] == ["object"]
            mask = decode_brush_rle(region["value"]["rle"], height, width)
            # the second click of the session extends the first: its mask goes back in
            feedback = previous if len(prompt.get("points", ())) == 2 else None
            expected = regcl.segment(data, multimask=False, return_logits=True,
                                     mask_input=feedback, **prompt)
            if feedback is not None:  # which differs from the points alone
                alone = regcl.segment(data, multimask=False, **prompt).masks[0].mask
                assert (alone != expected.masks[0].mask).sum() > 0
            previous = expected.masks[0].low_res_logits
            np.testing.assert_array_equal(mask, expected.masks[0].mask)
            assert mask.any()
            assert prediction["model_version"] == expected.adapter_version == "base"
            assert abs(prediction["score"] - expected.masks[0].score) < 1e-6
        assert _encodes(regcl) == encodes + 1  # 6 segmentations of one image, one encode
    assert origin.fetched(path) == 1  # fetched once, then the engine's store


def _encodes(client: Client) -> float:
    """The API's image-encoder runs so far (its Prometheus counter)."""
    (line,) = [x for x in client.metrics().splitlines()
               if x.startswith("regcl_image_encodes_total ")]
    return float(line.split()[1])


def test_no_prompt_no_mask(ls_anon: httpx.Client, origin: FileOrigin) -> None:
    path, _, _ = _image(origin, "noprompt", seed=4)
    for regions in (None, []):
        answer = ls_anon.post("/labelstudio/predict",
                              json=predict_body([task(1, path), task(2, path)], regions))
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"results": [{"result": [], "score": None,
                                              "model_version": "base"}] * 2}
    assert origin.fetched(path) == 0


def test_a_bad_task_in_a_batch_gets_an_empty_result(ls_anon: httpx.Client,
                                                    origin: FileOrigin) -> None:
    path, _, _ = _image(origin, "batch", seed=5)
    answer = ls_anon.post("/labelstudio/predict", json=predict_body(
        [task(1, "http://elsewhere.example/a.png"), task(2, path),
         task(3, "/data/upload/1/missing.png")], [keypoint(50, 50)]))
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [len(r["result"]) for r in results] == [0, 1, 0]
    assert all(r["model_version"] == "base" for r in results)


def _stored(ls_api: ApiServer, ls_redis: redis.Redis) -> SampleSets:
    from infra.artifacts import ArtifactStore
    from infra.datasets import DatasetRegistry

    store = ArtifactStore(ls_api.env["REGCL_ARTIFACT_URL"])
    return SampleSets(ls_redis, store, DatasetRegistry(ls_redis, store))


def test_annotations_feed_the_projects_sample_set(ls_api: ApiServer, ls_admin: httpx.Client,
                                                 ls_anon: httpx.Client, origin: FileOrigin,
                                                 ls_redis: redis.Redis) -> None:
    sets = _stored(ls_api, ls_redis)
    path, array, _ = _image(origin, "annotated", seed=6)
    mask = np.zeros(array.shape[:2], dtype=bool)
    mask[10:40, 20:70] = True
    event = annotation_event("ANNOTATION_CREATED", 40, 400, 4000, path,
                             [brush_region(mask), keypoint(30, 30)])
    assert_problem(ls_anon.post("/labelstudio/webhook", json=event), 401, "unauthorized")
    assert sets.entries("ls-40") == {}
    created = ls_admin.post("/labelstudio/webhook", json=event)
    assert created.status_code == 200, created.text
    assert created.json() == {"status": "ok", "action": "ANNOTATION_CREATED",
                              "domain": "ls-40", "samples": 1, "removed": 0, "pending": 1,
                              "job": None, "annotations": 1, "unchanged": 0, "failed": []}
    (entry,) = sets.entries("ls-40").values()
    assert entry.task == 4000 and len(entry.masks) == 1
    stored = rle_from_png(sets.store.get_bytes(entry.masks[0]))
    np.testing.assert_array_equal(stored, mask)
    second = mask.copy()
    second[50:90, 80:120] = True
    update = annotation_event("ANNOTATION_UPDATED", 40, 400, 4000, path,
                              [brush_region(mask), brush_region(second)])
    assert ls_admin.post("/labelstudio/webhook", json=update).json()["samples"] == 2
    assert len(sets.entries("ls-40")[400].masks) == 2
    deleted = ls_admin.post("/labelstudio/webhook", json=project_event(
        "ANNOTATIONS_DELETED", 40, annotations=[{"id": 400}, {"id": 999}]))
    assert deleted.status_code == 200 and deleted.json()["removed"] == 1
    assert sets.entries("ls-40") == {}
    ignored = ls_admin.post("/labelstudio/webhook", json=project_event("PROJECT_UPDATED", 40))
    assert ignored.json()["status"] == "ignored"


def rle_from_png(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.array(Image.open(io.BytesIO(data))) > 127


def test_training_needs_two_images_then_submits_one_step(
        ls_api: ApiServer, ls_admin: httpx.Client, origin: FileOrigin,
        ls_redis: redis.Redis) -> None:
    jobs = JobStore(ls_redis)
    start = project_event("START_TRAINING", 50)
    first, array, _ = _image(origin, "train-a", seed=8)
    mask = np.zeros(array.shape[:2], dtype=bool)
    mask[5:30, 5:30] = True
    ls_admin.post("/labelstudio/webhook", json=annotation_event(
        "ANNOTATION_CREATED", 50, 501, 5001, first, [brush_region(mask)]))
    assert_problem(ls_admin.post("/labelstudio/webhook", json=start), 409,
                   "not-enough-samples")
    assert _steps(jobs, "ls-50") == []
    second, _, _ = _image(origin, "train-b", seed=9)
    ls_admin.post("/labelstudio/webhook", json=annotation_event(
        "ANNOTATION_CREATED", 50, 502, 5002, second, [brush_region(mask)]))
    submitted = ls_admin.post("/labelstudio/webhook", json=start)
    assert submitted.status_code == 200, submitted.text
    job_id = submitted.json()["job"]
    record = jobs.get(job_id)
    assert record.kind == "continual" and record.params["domain"] == "ls-50"
    assert record.params["params"]["tolerance"] == 0.02  # REGCL_GATE_TOLERANCE's default
    again = ls_admin.post("/labelstudio/train", json={"project": "50.1712345678"})
    assert again.status_code == 200 and again.json() == {"status": "running",
                                                         "domain": "ls-50", "job": job_id}
    assert [j.id for j in _steps(jobs, "ls-50")] == [job_id]


def _steps(jobs: JobStore, domain: str) -> list:
    """The continual steps of ``domain`` (other modules' projects start steps of their own)."""
    return [j for j in jobs.list(kind="continual") if j.params.get("domain") == domain]


def test_every_n_annotation_changes_start_a_step(ls_admin: httpx.Client, origin: FileOrigin,
                                                 ls_redis: redis.Redis) -> None:
    jobs = JobStore(ls_redis)
    mask = np.zeros((96, 128), dtype=bool)
    mask[20:60, 30:90] = True
    answers = []
    for i in range(TRAIN_EVERY):
        path, _, _ = _image(origin, f"auto-{i}", seed=20 + i)
        answers.append(ls_admin.post("/labelstudio/webhook", json=annotation_event(
            "ANNOTATION_CREATED", 60, 600 + i, 6000 + i, path, [brush_region(mask)])).json())
    assert [a["pending"] for a in answers] == list(range(1, TRAIN_EVERY + 1))
    assert [a["job"] is not None for a in answers] == [False] * (TRAIN_EVERY - 1) + [True]
    assert jobs.get(answers[-1]["job"]).params["domain"] == "ls-60"
