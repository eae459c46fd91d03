"""Segmentation over real HTTP: parity with segment-anything's SamPredictor (masks decoded
from the RLE with pycocotools), the adapter-version header, PNG masks, mask-input round
trips, health and metrics. Bad prompts, bad images and size limits are in the bad-input
catalogue (tests/badinput)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from segment_anything import SamPredictor

from regcl.models import build_sam
from tests.service.api_support import (
    assert_problem,
    make_image,
    png_bytes,
)

IMAGE = make_image(0)  # 96 x 128
POINTS = [[40.0, 50.0], [100.0, 20.0]]
LABELS = [1, 0]
BOX = [10.0, 8.0, 90.0, 70.0]

PROMPTS = {
    "points-multimask": {"points": POINTS, "labels": LABELS, "multimask": True},
    "box-single": {"box": BOX, "multimask": False},
    "box-and-point": {"points": POINTS[:1], "labels": LABELS[:1], "box": BOX,
                      "multimask": True},
}


@pytest.fixture(scope="module")
def predictor() -> SamPredictor:
    """segment-anything's own predictor on the same weights, with IMAGE set."""
    predictor = SamPredictor(build_sam("tiny"))
    predictor.set_image(IMAGE)
    return predictor


@pytest.fixture(scope="module")
def image_id(api) -> str:
    with api.client() as client:
        response = client.post("/v1/images", files={"file": ("a.png", png_bytes(IMAGE),
                                                             "image/png")})
    assert response.status_code == 201, response.text
    return response.json()["image_id"]


def _reference(predictor: SamPredictor, prompt: dict, mask_input=None):
    return predictor.predict(
        point_coords=np.array(prompt["points"]) if "points" in prompt else None,
        point_labels=np.array(prompt["labels"]) if "labels" in prompt else None,
        box=np.array(prompt["box"]) if "box" in prompt else None,
        mask_input=mask_input, multimask_output=prompt["multimask"])


def _rle_masks(body: dict) -> np.ndarray:
    rles = [{"size": m["rle"]["size"], "counts": m["rle"]["counts"].encode()}
            for m in body["masks"]]
    return np.stack([mask_utils.decode(rle).astype(bool) for rle in rles])


def test_upload_multipart_and_json_give_the_same_id(anon, image_id):
    response = anon.post("/v1/images", json={
        "image_base64": base64.b64encode(png_bytes(IMAGE)).decode()})
    assert response.status_code == 201
    assert response.json() == {"image_id": image_id, "width": 128, "height": 96}


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_base_masks_equal_sam_predictor(anon, image_id, predictor, name):
    prompt = PROMPTS[name]
    response = anon.post("/v1/segment", json={"image_id": image_id, "adapter": "base",
                                              **prompt})
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["X-Regcl-Adapter-Version"] == body["adapter_version"] == "base"
    assert body["image_id"] == image_id
    masks, scores, _ = _reference(predictor, prompt)
    got = _rle_masks(body)
    assert got.shape == masks.shape == (3 if prompt["multimask"] else 1, 96, 128)
    np.testing.assert_array_equal(got, masks)
    np.testing.assert_allclose([m["score"] for m in body["masks"]], scores, rtol=0, atol=1e-5)
    for mask, item in zip(masks, body["masks"]):
        assert item["area"] == int(mask.sum())
        ys, xs = np.nonzero(mask)
        if xs.size:
            assert item["bbox"] == [int(xs.min()), int(ys.min()),
                                    int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def test_live_without_a_version_is_the_base_model_and_says_so(anon, image_id, predictor):
    prompt = PROMPTS["box-single"]
    first = anon.post("/v1/segment", json={"image_id": image_id, **prompt})
    second = anon.post("/v1/segment", json={"image_id": image_id, **prompt})
    assert first.status_code == second.status_code == 200
    assert first.json()["adapter_version"] == "base"
    assert first.headers["X-Regcl-Adapter-Version"] == "base"
    assert second.json()["cache_hit"] is True
    np.testing.assert_array_equal(_rle_masks(first.json()), _reference(predictor, prompt)[0])


def test_png_masks_and_inline_image(anon, predictor):
    prompt = PROMPTS["points-multimask"]
    response = anon.post("/v1/segment", json={
        "image_base64": base64.b64encode(png_bytes(IMAGE)).decode(), "format": "png",
        "adapter": "base", **prompt})
    assert response.status_code == 200, response.text
    pngs = [np.array(Image.open(io.BytesIO(base64.b64decode(m["png"]))))
            for m in response.json()["masks"]]
    np.testing.assert_array_equal(np.stack(pngs) == 255, _reference(predictor, prompt)[0])
    assert all(m["rle"] is None for m in response.json()["masks"])


def test_mask_input_round_trip(anon, image_id, predictor):
    prompt = {"points": POINTS[:1], "labels": [1], "multimask": False}
    first = anon.post("/v1/segment", json={"image_id": image_id, "adapter": "base",
                                           "return_logits": True, **prompt}).json()
    logits = first["masks"][0]["low_res_logits"]
    low_res = np.frombuffer(base64.b64decode(logits), dtype="<f4").reshape(1, 64, 64).copy()
    _, _, expected_low_res = _reference(predictor, prompt)
    np.testing.assert_allclose(low_res, expected_low_res, rtol=0, atol=1e-5)
    second = anon.post("/v1/segment", json={"image_id": image_id, "adapter": "base",
                                            "mask_input": logits, **prompt})
    assert second.status_code == 200, second.text
    masks, _, _ = _reference(predictor, prompt, mask_input=low_res)
    np.testing.assert_array_equal(_rle_masks(second.json()), masks)


def test_unknown_route_is_a_problem(anon):
    assert_problem(anon.get("/v1/nothing-here"), 404, "not-found")
    assert_problem(anon.delete("/v1/segment"), 405, "method-not-allowed")


def test_health_metrics_and_docs(anon, image_id):
    assert anon.get("/healthz").json() == {"status": "ok"}
    ready = anon.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    anon.post("/v1/segment", json={"image_id": image_id, "box": BOX})
    metrics = anon.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert 'regcl_http_requests_total{method="POST",route="/v1/segment",status="200"}' in text
    assert "regcl_http_request_duration_seconds_bucket" in text
    assert "regcl_embedding_cache_hits_total" in text
    assert "regcl_embedding_cache_misses_total" in text
    assert "regcl_live_version -1.0" in text
    assert "regcl_adapter_swap_seconds_count" in text
    assert 'regcl_segment_requests_total{adapter="live",cache="hit"}' in text
    assert anon.get("/docs").status_code == 200
    assert "/v1/segment" in anon.get("/openapi.json").json()["paths"]



def test_a_batch_answers_each_prompt_as_segment_does(anon, image_id):
    """``POST /v1/segment/batch``: prompts of different forms in one request (two share a
    decoder call) give what ``POST /v1/segment`` gives for each, in the prompts' order."""
    prompts = [{"points": POINTS, "labels": LABELS}, {"box": BOX},
               {"points": [[20.0, 30.0], [60.0, 40.0]], "labels": [1, 1]},
               {"points": POINTS[:1], "labels": LABELS[:1], "box": BOX}]
    response = anon.post("/v1/segment/batch", json={"image_id": image_id, "adapter": "base",
                                                    "prompts": prompts, "multimask": True})
    assert response.status_code == 200, response.text
    batch = response.json()
    assert batch["adapter_version"] == "base" == response.headers["X-Regcl-Adapter-Version"]
    assert batch["image_id"] == image_id and len(batch["results"]) == len(prompts)
    for prompt, got in zip(prompts, batch["results"], strict=True):
        single = anon.post("/v1/segment", json={"image_id": image_id, "adapter": "base",
                                                "multimask": True, **prompt}).json()
        assert len(got["masks"]) == len(single["masks"]) == 3
        np.testing.assert_array_equal(_rle_masks(got), _rle_masks(single))
        np.testing.assert_allclose([m["score"] for m in got["masks"]],
                                   [m["score"] for m in single["masks"]], atol=1e-4)
        assert [m["bbox"] for m in got["masks"]] == [m["bbox"] for m in single["masks"]]


def test_concurrent_cached_prompts_equal_sam_predictor(api, image_id, predictor):
    """16 clients at once on a cached embedding: the prompts the event loop hands to the
    decoder thread together (batched) answer what SamPredictor answers for each alone."""
    points = [[[8.0 * (i % 8) + 20, 10.0 * (i // 8) + 30]] for i in range(16)]

    def ask(point):
        with api.client() as client:
            return client.post("/v1/segment", json={"image_id": image_id, "adapter": "base",
                                                    "points": point, "labels": [1],
                                                    "multimask": False})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, points))
    for point, response in zip(points, answers):
        assert response.status_code == 200, response.text
        masks, scores, _ = _reference(predictor, {"points": point, "labels": [1],
                                                  "multimask": False})
        np.testing.assert_array_equal(_rle_masks(response.json()), masks)
        np.testing.assert_allclose(response.json()["masks"][0]["score"], scores[0], atol=1e-4)
