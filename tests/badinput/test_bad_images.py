"""Bad images, over real HTTP (``POST /v1/images`` multipart and JSON, and the inline image of
``POST /v1/segment``): not an image, truncated, zero bytes or zero pixels, decompression bombs,
formats outside the allow-list, wrong request content types. Each is a 4xx problem and leaves
the store untouched.

Decision on modes: grayscale, 1-bit, palette, RGBA (alpha dropped), CMYK and 16-bit grayscale
(scaled to 8 bits) are ACCEPTED and converted to RGB (``regcl.data.images``); floating-point
images (mode F) have no agreed range and are refused (422 ``invalid-image``). The declared
content type of a multipart part is ignored (the bytes are sniffed against an allow-list of
PNG, JPEG, BMP, TIFF, WebP); the request's own content type must be multipart or JSON (415).
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image

from tests.badinput.bad_support import image_file, png_with_header
from tests.service.api_support import assert_problem, make_image, png_bytes

RGB = make_image(0)  # 96 x 128
BOX = [10.0, 8.0, 90.0, 70.0]

BAD_IMAGES = {
    "not-an-image": b"hello, this is text",
    "truncated": png_bytes(RGB)[:200],
    "zero-bytes": b"",
    "zero-width-header": png_with_header(0, 64),
    "bomb-header-50k-x-50k": png_with_header(50_000, 50_000),
    "bomb-real-6000-x-6000-1bit": image_file(Image.new("1", (6000, 6000))),
    "gif": image_file(Image.fromarray(RGB), "GIF"),
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    "float-tiff": image_file(Image.fromarray(np.ones((8, 8), np.float32)), "TIFF"),
    "html-named-png": b"<html><script>alert(1)</script></html>",
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_upload_is_422(anon, store, case):
    data = BAD_IMAGES[case]
    with store.unchanged():
        response = anon.post("/v1/images", files={"file": (f"{case}.png", data, "image/png")})
        body = assert_problem(response, 422, "invalid-image")
        assert "Traceback" not in body["detail"]
        as_json = anon.post("/v1/images",
                            json={"image_base64": base64.b64encode(data).decode()})
        assert_problem(as_json, 422, "invalid-image")
        inline = anon.post("/v1/segment", json={
            "image_base64": base64.b64encode(data).decode(), "box": BOX})
        assert_problem(inline, 422, "invalid-image")


def _rgb_id(client, array: np.ndarray) -> str:
    response = client.post("/v1/images", files={"file": ("a.png", png_bytes(array),
                                                         "image/png")})
    assert response.status_code == 201, response.text
    return response.json()["image_id"]


GRAY = RGB[:, :, 0]
SIXTEEN = (GRAY.astype(np.uint16) * 257)  # 16-bit values whose 8-bit scaling is GRAY again
MODES = {
    # case: (file bytes, the RGB array it must be converted to)
    "grayscale-L": (png_bytes(GRAY), np.repeat(GRAY[:, :, None], 3, axis=2)),
    "rgba": (image_file(Image.fromarray(np.dstack([RGB, np.full(GRAY.shape, 7, np.uint8)]))),
             RGB),
    "palette-P": (image_file(Image.fromarray(RGB).quantize(16)),
                  np.array(Image.fromarray(RGB).quantize(16).convert("RGB"))),
    "16-bit-gray": (image_file(Image.fromarray(SIXTEEN)),
                    np.repeat(GRAY[:, :, None], 3, axis=2)),
    "1-bit": (image_file(Image.fromarray(GRAY > 100)),
              np.repeat(((GRAY > 100) * 255).astype(np.uint8)[:, :, None], 3, axis=2)),
}


@pytest.mark.parametrize("case", sorted(MODES))
def test_other_modes_are_converted_to_rgb(anon, case):
    data, expected = MODES[case]
    response = anon.post("/v1/images", files={"file": (f"{case}.png", data, "image/png")})
    assert response.status_code == 201, response.text
    assert response.json()["width"] == 128 and response.json()["height"] == 96
    assert response.json()["image_id"] == _rgb_id(anon, expected)  # same pixels, same id
    segment = anon.post("/v1/segment", json={"image_id": response.json()["image_id"],
                                             "box": BOX, "adapter": "base"})
    assert segment.status_code == 200, segment.text


def test_cmyk_jpeg_is_accepted(anon):
    data = image_file(Image.fromarray(RGB).convert("CMYK"), "JPEG")
    response = anon.post("/v1/images", files={"file": ("c.jpg", data, "image/jpeg")})
    assert response.status_code == 201, response.text
    assert (response.json()["width"], response.json()["height"]) == (128, 96)


def test_declared_part_type_is_ignored_bytes_decide(anon):
    response = anon.post("/v1/images", files={"file": ("a.txt", png_bytes(RGB), "text/plain")})
    assert response.status_code == 201, response.text
    assert response.json()["image_id"] == _rgb_id(anon, RGB)


WRONG_CONTENT_TYPES = {
    "raw-png": (png_bytes(RGB), "image/png", 415, "unsupported-media-type"),
    "text-plain": (b"hello", "text/plain", 415, "unsupported-media-type"),
    "no-content-type": (b"hello", None, 415, "unsupported-media-type"),
    "form-urlencoded": (b"file=abc", "application/x-www-form-urlencoded", 415,
                        "unsupported-media-type"),
    "json-not-json": (b"{not json", "application/json", 422, "validation-error"),
    "json-wrong-field": (b'{"image": "abc"}', "application/json", 422, "validation-error"),
    "json-not-base64": (b'{"image_base64": "not base64!"}', "application/json", 422,
                        "invalid-base64"),
    "multipart-without-file": (b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n"
                               b"--b--\r\n", "multipart/form-data; boundary=b", 400,
                               "bad-request"),
    "multipart-broken": (b"garbage", "multipart/form-data; boundary=b", 400, "bad-request"),
}


@pytest.mark.parametrize("case", sorted(WRONG_CONTENT_TYPES))
def test_wrong_content_type_is_4xx(anon, store, case):
    data, content_type, status, code = WRONG_CONTENT_TYPES[case]
    headers = {"content-type": content_type} if content_type else {}
    with store.unchanged():
        response = anon.post("/v1/images", content=data, headers=headers)
        assert_problem(response, status, code)
