"""The HTTP client against the REAL API (uvicorn, redis-server; see conftest.py): health,
images in every form, segmentation (masks decoded from RLE and PNG, logits, batch), adapters,
datasets, and every error status mapped to its class with the problem's ``type``."""

from __future__ import annotations

import email.utils
import io
import pickle
import time
import zipfile

import httpx
import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from safetensors.torch import load_file

from regcl.client import (
    ApiConnectionError,
    ApiError,
    AuthError,
    Client,
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UnauthorizedError,
    WaitTimeoutError,
)
from regcl.client.errors import error_from_response
from regcl.errors import RegclError
from tests.conftest import free_tcp_port
from tests.service.api_support import (
    MAX_UPLOAD_BYTES,
    folder_entries,
    make_adapter,
    make_image,
    make_zip,
    png_bytes,
)

pytestmark = pytest.mark.slow  # a worker and two API processes start for tests/client

IMAGE = make_image(7)  # 96 x 128 x 3 uint8
POINTS = [[40.0, 30.0], [90.0, 60.0]]
BOX = [10.0, 8.0, 90.0, 70.0]


def test_health_readiness_and_metrics(anon):
    assert anon.health() is True
    ready = anon.ready()
    assert ready.ready and ready.model_loaded and ready.redis
    assert anon.wait_ready(timeout=10).ready
    assert "regcl_" in anon.metrics()


def test_an_unreachable_service_raises_connection_errors():
    with Client(f"http://127.0.0.1:{free_tcp_port()}", timeout=2.0) as client:
        with pytest.raises(ApiConnectionError) as info:
            client.health()
        assert isinstance(info.value, ConnectionError) and isinstance(info.value, RegclError)
        with pytest.raises(WaitTimeoutError):
            client.wait_ready(timeout=0.5, poll_s=0.1)


def test_an_image_uploads_alike_from_a_path_bytes_an_array_and_a_pil_image(anon, tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(IMAGE))
    infos = [anon.upload_image(image) for image in
             (path, str(path), path.read_bytes(), IMAGE, Image.fromarray(IMAGE))]
    assert {info.image_id for info in infos} == {infos[0].image_id}
    assert (infos[0].width, infos[0].height) == (128, 96)


def _raw_masks(api_url: str, body: dict) -> list[np.ndarray]:
    """The same request sent without the client; masks decoded here with pycocotools."""
    response = httpx.post(f"{api_url}/v1/segment", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [mask_utils.decode({"size": m["rle"]["size"], "counts": m["rle"]["counts"]
                               .encode()}).astype(bool) for m in response.json()["masks"]]


def test_segment_decodes_masks_that_match_the_wire_and_the_servers_own_figures(anon,
                                                                               platform):
    result = anon.segment(IMAGE, points=POINTS, labels=[1, 0])
    assert result.adapter_version == "base" and len(result.masks) == 3  # multimask
    assert result.arrays.shape == (3, 96, 128) and result.arrays.dtype == bool
    raw = _raw_masks(platform.api.url, {
        "image_id": result.image_id, "points": POINTS, "labels": [1, 0]})
    for mask, wire in zip(result.masks, raw, strict=True):
        assert np.array_equal(mask.mask, wire)
        assert mask.area == int(mask.mask.sum())  # the server's area, from its own mask
        if mask.area:
            ys, xs = np.nonzero(mask.mask)
            assert mask.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                 ys.max() - ys.min() + 1)
    assert result.best.score == max(result.scores)
    as_png = anon.segment(image_id=result.image_id, points=POINTS, labels=[1, 0],
                          mask_format="png")
    assert as_png.cache_hit
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(result.masks, as_png.masks))


def test_box_logits_mask_input_and_an_uploaded_image(anon):
    info = anon.upload_image(IMAGE)
    first = anon.segment(info, box=BOX, multimask=False, return_logits=True)
    assert len(first.masks) == 1 and first.image_id == info.image_id
    logits = first.masks[0].low_res_logits
    assert logits is not None and logits.shape == (64, 64) and logits.dtype == np.float32
    again = anon.segment(image_id=info.image_id, box=BOX, mask_input=first.masks[0],
                         multimask=False)
    by_array = anon.segment(image_id=info.image_id, box=BOX, mask_input=logits,
                            multimask=False)
    assert np.array_equal(again.masks[0].mask, by_array.masks[0].mask)
    assert again.masks[0].low_res_logits is None  # not asked for


def test_a_batch_equals_its_prompts_one_by_one(anon):
    info = anon.upload_image(IMAGE)
    prompts = [{"points": [POINTS[0]]}, {"box": BOX}, {"points": POINTS, "labels": [1, 1]}]
    batch = anon.segment_batch(info, prompts, multimask=False)
    assert len(batch.results) == 3 and batch.image_id == info.image_id
    for prompt, result in zip(prompts, batch.results, strict=True):
        single = anon.segment(info, multimask=False, **prompt)
        assert np.array_equal(single.masks[0].mask, result.masks[0].mask)
        assert single.masks[0].score == pytest.approx(result.masks[0].score, abs=1e-5)


def test_adapters_upload_list_get_download_serve_and_delete(admin, anon, tmp_path):
    source = make_adapter(tmp_path / "made", seed=11)
    uploaded = admin.upload_adapter("client-a", source, domain="polyp",
                                    metadata={"note": "client test"})
    assert uploaded.name == "client-a" and uploaded.domain == "polyp" and uploaded.has_stats
    assert uploaded.metadata["note"] == "client test"
    assert "client-a" in [a.name for a in anon.list_adapters()]
    assert anon.get_adapter("client-a") == uploaded
    folder = anon.download_adapter("client-a", tmp_path / "down")
    assert folder == tmp_path / "down" / "client-a"
    for name in ("adapter_model.safetensors", "regcl_stats.safetensors"):
        ours, theirs = load_file(str(source / name)), load_file(str(folder / name))
        assert ours.keys() == theirs.keys()
        assert all((ours[k] == theirs[k]).all() for k in ours)
    served = anon.segment(IMAGE, points=POINTS[:1], adapter="client-a")
    assert served.adapter_version == "domain:client-a"
    with pytest.raises(ConflictError) as conflict:
        admin.upload_adapter("client-a", source)
    assert conflict.value.status == 409 and conflict.value.code == "conflict"
    admin.delete_adapter("client-a")
    with pytest.raises(NotFoundError):
        anon.get_adapter("client-a")


def test_datasets_from_a_folder_a_zip_file_and_bytes(admin, tmp_path):
    entries = folder_entries(count=3)
    archive = make_zip(entries)
    (tmp_path / "ds.zip").write_bytes(archive)
    folder = tmp_path / "folder"
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        zf.extractall(folder)
    made = [admin.upload_dataset("client-folder", folder, metadata={"domain": "polyp"}),
            admin.upload_dataset("client-zip", tmp_path / "ds.zip"),
            admin.upload_dataset("client-bytes", archive)]
    assert [(d.format, d.count) for d in made] == [("folders", 3)] * 3
    assert made[0].metadata == {"domain": "polyp"}
    assert {"client-folder", "client-zip", "client-bytes"} <= {
        d.name for d in admin.list_datasets()}
    assert admin.get_dataset("client-zip") == made[1]
    for dataset in made:
        admin.delete_dataset(dataset.name)
    with pytest.raises(NotFoundError):
        admin.get_dataset("client-zip")


def _raised(call) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    return info.value


def test_error_statuses_map_to_their_classes_with_the_problem_type(admin, anon, keyless_api):
    keyless = Client(keyless_api.url, "some-key-0123456789")
    cases = [
        (lambda: anon.submit_train("any", "polyp"), UnauthorizedError, 401, "unauthorized"),
        (lambda: keyless.delete_dataset("x"), ForbiddenError, 403, "mutations-disabled"),
        (lambda: anon.get_job("0123456789abcdef0123456789abcdef"), NotFoundError, 404,
         "not-found"),
        (lambda: anon.segment(image_id="f" * 64, points=POINTS), NotFoundError, 404,
         "image-not-found"),
        (lambda: anon.upload_image(b"\x89PNG" + bytes(MAX_UPLOAD_BYTES)),
         PayloadTooLargeError, 413, "payload-too-large"),
        (lambda: anon.segment(IMAGE), InvalidRequestError, 422, "empty-prompt"),
        (lambda: anon.segment(IMAGE, points=[[1e6, 5.0]]), InvalidRequestError, 422,
         "out-of-bounds"),
        (lambda: admin.submit_merge(["no-such-adapter"]), NotFoundError, 404, "not-found"),
    ]
    for call, cls, status, code in cases:
        error = _raised(call)
        assert type(error) is cls, (code, error)
        assert (error.status, error.code) == (status, code), error
        assert error.type == f"https://regcl.dev/problems/{code}" and error.title
        assert error.body["status"] == status and isinstance(error, RegclError)
        assert str(status) in str(error) and code in str(error)
    assert isinstance(_raised(cases[0][0]), AuthError | PermissionError)
    assert isinstance(_raised(cases[5][0]), ValueError)
    assert isinstance(_raised(cases[2][0]), LookupError)
    keyless.close()


def test_an_answer_that_is_not_problem_json_still_maps_by_status():
    error = error_from_response(502, b"<html>bad gateway</html>", "GET", "/v1/jobs",
                                "Bad Gateway")
    assert type(error) is ApiError and error.type == "about:blank"
    assert error.title == "Bad Gateway" and "bad gateway" in (error.detail or "")
    error = error_from_response(418, b'{"type": "https://regcl.dev/problems/teapot", '
                                     b'"title": "Teapot", "status": 418}')
    assert type(error) is ApiError and error.code == "teapot" and error.title == "Teapot"


def test_retry_after_is_read_in_seconds_from_either_form():
    body = b'{"type": "https://regcl.dev/problems/store-unavailable", "title": "x", "status": 503}'
    error = error_from_response(503, body, headers={"Retry-After": "5"})
    assert type(error) is ServiceUnavailableError and error.retry_after == 5.0
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    assert 100 < error_from_response(503, body, headers={"retry-after": later}).retry_after <= 120
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert error_from_response(503, body, headers={"Retry-After": past}).retry_after == 0.0
    for headers in (None, {}, {"Retry-After": "soon"}, {"Retry-After": "-3"}):
        assert error_from_response(503, body, headers=headers).retry_after is None
    assert pickle.loads(pickle.dumps(error)).retry_after == 5.0
