"""Bad prompts over real HTTP (``POST /v1/segment``): points or boxes outside the image,
NaN / infinity, wrong shapes, empty prompts, too many points, labels other than 0/1,
malformed mask inputs and request bodies. Each is a 422 problem with its own stable type
(schema errors: ``validation-error``) and leaves the store untouched."""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest

from tests.badinput.bad_support import post_json
from tests.service.api_support import assert_problem, make_image, png_bytes

IMAGE = make_image(0)  # 96 x 128 (H x W)
MASK_SIDE = 64  # tiny SAM: 4 x its 16 x 16 embedding


def _mask_input(values: np.ndarray) -> str:
    return base64.b64encode(values.astype("<f4").tobytes()).decode()


NAN_MASK = np.zeros((MASK_SIDE, MASK_SIDE), np.float32)
NAN_MASK[3, 3] = np.nan
P = [[10.0, 10.0]]

BAD_PROMPTS = {
    # case: (prompt fields, problem code)
    "point-outside-x": ({"points": [[500.0, 10.0]], "labels": [1]}, "out-of-bounds"),
    "point-outside-negative": ({"points": [[-1.0, 10.0]], "labels": [1]}, "out-of-bounds"),
    "point-outside-y": ({"points": [[10.0, 97.0]], "labels": [1]}, "out-of-bounds"),
    "box-outside": ({"box": [0.0, 0.0, 129.0, 50.0]}, "out-of-bounds"),
    "box-negative": ({"box": [-5.0, 0.0, 20.0, 50.0]}, "out-of-bounds"),
    "point-nan": ({"points": [[math.nan, 10.0]], "labels": [1]}, "non-finite-value"),
    "point-inf": ({"points": [[math.inf, 10.0]], "labels": [1]}, "non-finite-value"),
    "point-minus-inf": ({"points": [[10.0, -math.inf]], "labels": [1]}, "non-finite-value"),
    "box-nan": ({"box": [0.0, math.nan, 20.0, 50.0]}, "non-finite-value"),
    "box-inf": ({"box": [0.0, 0.0, math.inf, 50.0]}, "non-finite-value"),
    "label-nan": ({"points": P, "labels": [math.nan]}, "invalid-label"),
    "mask-input-nan": ({"mask_input": _mask_input(NAN_MASK)}, "non-finite-value"),
    "point-three-coords": ({"points": [[1.0, 2.0, 3.0]], "labels": [1]}, "prompt-shape"),
    "point-one-coord": ({"points": [[1.0]], "labels": [1]}, "prompt-shape"),
    "points-ragged": ({"points": [[1.0], [1.0, 2.0]], "labels": [1, 1]}, "prompt-shape"),
    "labels-missing": ({"points": P}, "prompt-shape"),
    "labels-without-points": ({"labels": [1]}, "prompt-shape"),
    "labels-count-mismatch": ({"points": P, "labels": [1, 0]}, "prompt-shape"),
    "box-three-values": ({"box": [1.0, 2.0, 3.0]}, "prompt-shape"),
    "box-five-values": ({"box": [1.0, 2.0, 3.0, 4.0, 5.0]}, "prompt-shape"),
    "box-empty": ({"box": []}, "prompt-shape"),
    "empty-prompt": ({}, "empty-prompt"),
    "empty-points": ({"points": [], "labels": []}, "empty-prompt"),
    "all-null": ({"points": None, "labels": None, "box": None, "mask_input": None},
                 "empty-prompt"),
    "too-many-points": ({"points": [[1.0, 1.0]] * 65, "labels": [1] * 65}, "too-many-points"),
    "label-2": ({"points": P, "labels": [2]}, "invalid-label"),
    "label-minus-1": ({"points": P, "labels": [-1]}, "invalid-label"),
    "label-half": ({"points": P, "labels": [0.5]}, "invalid-label"),
    "mask-input-huge": ({"mask_input": _mask_input(np.full((MASK_SIDE, MASK_SIDE), 3e38))},
                        "value-out-of-range"),
    "mask-input-size": ({"mask_input": base64.b64encode(b"\0" * 64).decode()}, "prompt-shape"),
    "mask-input-too-big": ({"mask_input": _mask_input(np.zeros((128, 128)))},
                           "payload-too-large"),
    "mask-input-not-base64": ({"mask_input": "not base64!"}, "invalid-base64"),
    # schema errors (pydantic): types, limits, unknown fields, image source
    "points-strings": ({"points": [["a", "b"]], "labels": [1]}, "validation-error"),
    "points-not-list": ({"points": "10,10", "labels": [1]}, "validation-error"),
    "box-nested": ({"box": [[1.0, 2.0, 3.0, 4.0]]}, "validation-error"),
    "label-string": ({"points": P, "labels": ["fg"]}, "validation-error"),
    "points-over-schema-limit": ({"points": [[1.0, 1.0]] * 1025, "labels": [1] * 1025},
                                 "validation-error"),
    "unknown-field": ({"box": [1.0, 2.0, 3.0, 4.0], "prompt": "cat"}, "validation-error"),
    "bad-format": ({"box": [1.0, 2.0, 3.0, 4.0], "format": "jpeg"}, "validation-error"),
    "multimask-string": ({"box": [1.0, 2.0, 3.0, 4.0], "multimask": "maybe"},
                         "validation-error"),
}


@pytest.fixture(scope="module")
def image_id(api, seeded) -> str:
    with api.client() as client:
        response = client.post("/v1/images", files={"file": ("a.png", png_bytes(IMAGE),
                                                             "image/png")})
    assert response.status_code == 201, response.text
    return response.json()["image_id"]


def test_a_box_is_its_two_corners_in_either_order(anon, store, image_id):
    """The document cannot state x0 <= x1 (JSON Schema compares no two values), so the API
    reads a box as the rectangle between two opposite corners, in either order."""
    answers = []
    with store.unchanged():
        for box in ([20.0, 10.0, 60.0, 50.0], [60.0, 10.0, 20.0, 50.0], [20.0, 50.0, 60.0, 10.0],
                    [60.0, 50.0, 20.0, 10.0]):
            response = post_json(anon, "/v1/segment", {"image_id": image_id, "box": box})
            assert response.status_code == 200, response.text
            answers.append([m["rle"] for m in response.json()["masks"]])
    assert all(answer == answers[0] for answer in answers[1:])


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_bad_prompt_is_422(anon, store, image_id, case):
    prompt, code = BAD_PROMPTS[case]
    status = 413 if code == "payload-too-large" else 422
    with store.unchanged():
        response = post_json(anon, "/v1/segment", {"image_id": image_id, **prompt})
        body = assert_problem(response, status, code)
        assert body["detail"] and body["instance"] == "/v1/segment"


BAD_REQUESTS = {
    # case: (body, status, code)
    "no-image": ({"box": [1.0, 2.0, 3.0, 4.0]}, 422, "validation-error"),
    "both-images": ({"image_id": "x", "image_base64": "eA==", "box": [1.0, 2.0, 3.0, 4.0]},
                    422, "validation-error"),
    "unknown-image": ({"image_id": "0" * 64, "box": [1.0, 2.0, 3.0, 4.0]}, 404,
                      "image-not-found"),
    "image-id-too-long": ({"image_id": "0" * 129, "box": [1.0, 2.0, 3.0, 4.0]}, 422,
                          "validation-error"),
    "body-is-a-list": ([1, 2, 3], 422, "validation-error"),
    "body-is-null": (None, 422, "validation-error"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_segment_request(anon, store, case):
    body, status, code = BAD_REQUESTS[case]
    with store.unchanged():
        assert_problem(post_json(anon, "/v1/segment", body), status, code)


@pytest.mark.parametrize("adapter", ["nope", "../seed-stats", "seed-stats/../x", "a\\b", "..",
                                     "UPPER", "x" * 64])
def test_unknown_or_malformed_adapter_names(anon, store, image_id, adapter):
    with store.unchanged():
        response = anon.post("/v1/segment", json={"image_id": image_id, "adapter": adapter,
                                                  "box": [10.0, 8.0, 90.0, 70.0]})
        assert response.status_code in (404, 422), response.text
        assert_problem(response, response.status_code,
                       "unknown-adapter" if response.status_code == 404 else "invalid-name")


def test_not_json_body(anon, store):
    with store.unchanged():
        assert_problem(anon.post("/v1/segment", content=b"{not json",
                                 headers={"content-type": "application/json"}), 422,
                       "validation-error")
        assert_problem(anon.post("/v1/segment", content=b"\xff\xfe\x00",  # not UTF-8
                                 headers={"content-type": "application/json"}), 400,
                       "bad-request")


GOOD_PROMPT = {"points": [[10.0, 10.0]], "labels": [1]}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_a_bad_prompt_refuses_the_whole_batch(anon, store, image_id, case):
    """``POST /v1/segment/batch``: the same catalogue, each bad prompt after a good one."""
    prompt, code = BAD_PROMPTS[case]
    status = 413 if code == "payload-too-large" else 422
    with store.unchanged():
        response = post_json(anon, "/v1/segment/batch",
                             {"image_id": image_id, "prompts": [GOOD_PROMPT, prompt]})
        body = assert_problem(response, status, code)
        assert body["detail"] and body["instance"] == "/v1/segment/batch"


BAD_BATCHES = {
    # case: (body, status, code)
    "no-prompts": ({"prompts": []}, 422, "validation-error"),
    "prompts-missing": ({}, 422, "validation-error"),
    "too-many-prompts": ({"prompts": [GOOD_PROMPT] * 65}, 422, "validation-error"),
    "prompts-not-a-list": ({"prompts": GOOD_PROMPT}, 422, "validation-error"),
    "prompt-not-an-object": ({"prompts": [[1, 2]]}, 422, "validation-error"),
    "unknown-prompt-field": ({"prompts": [{**GOOD_PROMPT, "multimask": True}]}, 422,
                             "validation-error"),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_bad_batch_request(anon, store, image_id, case):
    body, status, code = BAD_BATCHES[case]
    with store.unchanged():
        assert_problem(post_json(anon, "/v1/segment/batch", {"image_id": image_id, **body}),
                       status, code)
    with store.unchanged():
        assert_problem(post_json(anon, "/v1/segment/batch",
                                 {"image_id": "0" * 64, "prompts": [GOOD_PROMPT]}),
                       404, "image-not-found")
