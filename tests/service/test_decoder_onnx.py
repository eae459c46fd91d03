"""Decoding on the client's side: the served embedding (``GET /v1/images/{id}/embedding``)
and decoder (``GET /v1/models/decoder.onnx``), run with onnxruntime, give the masks
``POST /v1/segment`` gives for the same prompt, over the real HTTP server.

Tolerance: masks equal pixel for pixel, scores within 1e-4, low-res logits within 1e-3. The
ONNX graph does the same float32 operations as the server's torch code, but onnxruntime's
kernels (matmul blocking, fused attention, resize) sum in another order, so logits differ in
the last bits (seen: 1.3e-5); a pixel whose logit is that close to 0 would flip, and none
does on these prompts.
"""

from __future__ import annotations

import numpy as np
import pytest

from regcl.client import Embedding
from regcl.client.local_decoding import LocalDecoder
from tests.service.api_support import make_image

pytest.importorskip("onnxruntime")

IMAGE = make_image(3, height=90, width=140)  # not square: the resize and crop matter
POINTS = [[40.0, 50.0], [100.0, 20.0]]
LABELS = [1, 0]
BOX = [10.0, 8.0, 90.0, 70.0]
PROMPTS = {
    "one-point-single": {"points": POINTS[:1], "labels": [1], "multimask": False},
    "points-multimask": {"points": POINTS, "labels": LABELS, "multimask": True},
    "box-single": {"box": BOX, "multimask": False},
    "box-and-point": {"points": POINTS[:1], "labels": [1], "box": BOX, "multimask": True},
}


@pytest.fixture(scope="module")
def client(api):
    with api.api() as client:
        yield client


@pytest.fixture(scope="module")
def image(client):
    return client.upload_image(IMAGE)


@pytest.fixture(scope="module")
def embedding(client, image) -> Embedding:
    embedding = client.embedding(image)
    assert embedding is not None
    return embedding


@pytest.fixture(scope="module")
def decoder(client) -> LocalDecoder:
    return LocalDecoder(client.decoder_onnx())


def _same(server, local) -> None:
    got = np.stack([m.mask for m in server.masks])
    assert got.shape == local.masks.shape
    assert np.array_equal(got, local.masks), f"{(got != local.masks).sum()} pixels differ"
    np.testing.assert_allclose(server.scores, local.scores, atol=1e-4)


def test_embedding_route(client, image, embedding, api) -> None:
    assert embedding.features.dtype == np.float32
    assert embedding.features.shape == (1, 128, 16, 16)  # tiny: C = 128, 16 x 16
    assert embedding.original_size == (90, 140)
    assert embedding.input_size == (165, 256)  # long side to 256: 90 * 256 / 140 = 164.6
    seg = client.segment(image, points=POINTS[:1], multimask=False)
    assert embedding.adapter_version == seg.adapter_version
    assert client.embedding(image, etag=embedding.etag) is None  # still current: 304
    with api.client() as raw:
        fresh = raw.get(f"/v1/images/{image.image_id}/embedding",
                        headers={"If-None-Match": embedding.etag})
        assert fresh.status_code == 304 and fresh.content == b""
        assert fresh.headers["ETag"] == embedding.etag
        base = raw.get(f"/v1/images/{image.image_id}/embedding", params={"adapter": "base"},
                       headers={"If-None-Match": '"another"'})
        assert base.status_code == 200
        assert base.headers["content-type"] == "application/x-npy"
        missing = raw.get(f"/v1/images/{'0' * 64}/embedding")
        assert missing.status_code == 404
        assert missing.json()["type"].endswith("/image-not-found")


def test_decoder_route_is_cached(api) -> None:
    with api.client() as raw:
        first = raw.get("/v1/models/decoder.onnx")
        assert first.status_code == 200 and len(first.content) > 100_000
        again = raw.get("/v1/models/decoder.onnx", headers={"If-None-Match": first.headers["ETag"]})
        assert again.status_code == 304
        assert raw.get("/v1/models/decoder.onnx").content == first.content


@pytest.mark.parametrize("name", list(PROMPTS))
def test_local_masks_equal_the_servers(client, image, embedding, decoder, name) -> None:
    prompt = dict(PROMPTS[name])
    multimask = prompt.pop("multimask")
    server = client.segment(image, multimask=multimask, **prompt)
    local = decoder.decode(embedding, multimask=multimask, **prompt)
    _same(server, local)


def test_mask_input_round_trip(client, image, embedding, decoder) -> None:
    """A second click refining the first answer's low-res logits, both ways."""
    first = client.segment(image, points=POINTS[:1], multimask=False, return_logits=True)
    local_first = decoder.decode(embedding, points=POINTS[:1], multimask=False)
    np.testing.assert_allclose(first.masks[0].low_res_logits, local_first.low_res_logits[0],
                               atol=1e-3)
    logits = first.masks[0].low_res_logits
    server = client.segment(image, points=POINTS, labels=LABELS, mask_input=logits,
                            multimask=False)
    local = decoder.decode(embedding, points=POINTS, labels=LABELS, mask_input=logits,
                           multimask=False)
    _same(server, local)
