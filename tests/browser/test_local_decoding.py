"""Masks decoded in the browser (onnxruntime-web from ``make vendor``) against the real stack:
clicks give masks with no ``POST /v1/segment`` request and one embedding download per image
and version, pixel for pixel the API's masks for the same prompt; after a hot swap the next
mask comes from the new version; with onnxruntime-web absent (its files answered 404) the page
falls back to ``POST /v1/segment``. Click-to-mask times of both ways are printed (``-s``
shows them; docs/benchmarks.md records a run).

Without the vendored files these tests skip, unless ``CI`` is set (then they fail).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from regcl.client import Client
from tests.browser.test_web_page import (
    WAIT_MS,
    assert_overlay_is_api_mask,
    canvas_mask,
    click_image,
    png_bytes,
    scene,
    upload_adapter,
    wait_done,
    wait_js,
)
from tests.service.api_support import ADMIN_KEY

pytestmark = pytest.mark.slow

VENDOR = Path(__file__).resolve().parents[2] / "service" / "static" / "vendor" / \
    "onnxruntime-web" / "ort.wasm.min.mjs"
CLICKS = [(100, 70), (120, 60), (80, 90), (140, 80), (110, 50), (70, 60), (130, 95)]


@pytest.fixture(autouse=True)
def _vendored() -> None:
    if not VENDOR.is_file():
        if os.environ.get("CI"):
            pytest.fail("onnxruntime-web is not vendored (`make vendor`); CI must test it")
        pytest.skip("onnxruntime-web is not vendored (`make vendor`)")


class Traffic:
    """The page's requests to the segmentation and embedding routes."""

    def __init__(self, page) -> None:
        self.segment: list[str] = []
        self.embedding: list[int] = []  # statuses
        page.on("request", lambda r: self.segment.append(r.url)
                if urlparse(r.url).path.startswith("/v1/segment") else None)
        page.on("response", lambda r: self.embedding.append(r.status)
                if urlparse(r.url).path.endswith("/embedding") else None)


def open_scene(page, stack, decoder: str) -> None:
    page.goto(stack.url + "/")
    wait_js(page, "document.querySelector('#stage').dataset.decoder === arg", decoder)
    page.set_input_files("#image-file", files=[{"name": "scene.png", "mimeType": "image/png",
                                                "buffer": png_bytes(scene())}])
    wait_js(page, "document.querySelector('#stage').dataset.state === 'ready'")


def click_to_mask(page, count: int) -> tuple[list[float], list[float]]:
    """Click CLICKS[:count] one after the other (each a new point); the page's click-to-mask
    time of each (ms, from the prompt to the mask drawn) and, when decoded in the browser, the
    decoder's part of it."""
    times, decoding = [], []
    stage = page.locator("#stage")
    for n, (x, y) in enumerate(CLICKS[:count], start=1):
        click_image(page, x, y)
        wait_done(page, n)
        times.append(float(stage.get_attribute("data-ms")))
        if stage.get_attribute("data-decode-ms"):
            decoding.append(float(stage.get_attribute("data-decode-ms")))
    return times, decoding


def report(label: str, times: list[float], decoding: list[float]) -> None:
    def later(values: list[float]) -> str:
        rest = values[1:]
        return (f"median {statistics.median(rest):.1f} ms (min {min(rest):.1f}, max "
                f"{max(rest):.1f})")

    line = (f"click-to-mask, {label}: first click {times[0]:.1f} ms, the {len(times) - 1} "
            f"next {later(times)}")
    if decoding:
        line += f"; ONNX decode alone {later(decoding)}"
    print(line)


def test_clicks_decode_in_the_browser_without_segment_requests(stack, page):
    traffic = Traffic(page)
    open_scene(page, stack, "browser")
    times, decoding = click_to_mask(page, len(CLICKS))
    stage = page.locator("#stage")
    assert stage.get_attribute("data-decoded") == "browser"
    assert traffic.segment == [], f"the page asked the server to segment: {traffic.segment}"
    # One download of the embedding; every later click only revalidated it (304, no body).
    assert traffic.embedding.count(200) == 1 and traffic.embedding.count(304) == len(CLICKS) - 1
    with stack.client() as client:
        checked = assert_overlay_is_api_mask(page, client)
    assert len(checked["request"]["points"]) == len(CLICKS)
    # Multimask off: the single-mask answer, also equal.
    page.uncheck("#multimask-toggle")
    wait_js(page, "document.querySelector('#stage').dataset.maskIndex === '0' && "
            "JSON.parse(document.querySelector('#stage').dataset.request).multimask === false")
    wait_js(page, "document.querySelector('#stage').dataset.state === 'done'")
    with stack.client() as client:
        assert_overlay_is_api_mask(page, client)
    assert traffic.segment == []
    report("in the browser (onnxruntime-web, wasm, 1 thread)", times, decoding)


def test_without_onnxruntime_web_the_page_asks_the_server(stack, page):
    page.route("**/ui/vendor/**", lambda route: route.fulfill(status=404, body="absent"))
    traffic = Traffic(page)
    open_scene(page, stack, "server")
    times, _ = click_to_mask(page, len(CLICKS))
    assert page.locator("#stage").get_attribute("data-decoded") == "server"
    assert len(traffic.segment) == len(CLICKS)
    assert traffic.embedding == []
    with stack.client() as client:
        assert_overlay_is_api_mask(page, client)
    report("on the server (POST /v1/segment)", times, [])


def _new_version(stack, tmp_path: Path, seed: int) -> int:
    """A new version made the service's way (upload a domain adapter, merge it in), so later
    modules on this session's stack can merge on top of it."""
    name = f"local-{seed}"
    with stack.client() as client:
        upload_adapter(client, tmp_path, name, seed)
    with Client(stack.url, ADMIN_KEY) as client:
        job = client.wait(client.submit_merge([name]), 300, check=True)
    return job.result["version"]


def _activate(stack, number: int) -> None:
    """Activate version ``number`` and wait until the API serves it."""
    with stack.client() as client:
        response = client.post(f"/v1/versions/{number}/activate")
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + WAIT_MS / 1000
        while client.get("/v1/versions/live").json()["served_version"] != number:
            assert time.monotonic() < deadline, f"version {number} is not served"
            time.sleep(0.1)


def test_after_a_hot_swap_the_next_mask_comes_from_the_new_version(stack, page, tmp_path):
    first, second = _new_version(stack, tmp_path, 11), _new_version(stack, tmp_path, 12)
    _activate(stack, first)
    traffic = Traffic(page)
    open_scene(page, stack, "browser")
    click_image(page, 100, 70)
    wait_done(page, 1)
    stage = page.locator("#stage")
    assert stage.get_attribute("data-adapter-version") == f"live:{first}"
    with stack.client() as client:
        assert_overlay_is_api_mask(page, client)

    _activate(stack, second)  # the page is not told: its next click finds out
    click_image(page, 120, 60)
    wait_done(page, 2)
    assert stage.get_attribute("data-adapter-version") == f"live:{second}"
    assert stage.get_attribute("data-decoded") == "browser"
    with stack.client() as client:
        checked = assert_overlay_is_api_mask(page, client)
    assert traffic.segment == []
    assert traffic.embedding.count(200) == 2  # one download per version

    # The old version gives another mask for the same clicks, so the overlay really is the
    # new version's (not the old embedding under a new label).
    _activate(stack, first)
    with stack.client() as client:
        response = client.post("/v1/segment", json=checked["request"])
    assert response.json()["adapter_version"] == f"live:{first}"
    overlay = canvas_mask(page, "#mask-canvas")
    old = mask_utils.decode({"size": response.json()["masks"][checked["index"]]["rle"]["size"],
                             "counts": response.json()["masks"][checked["index"]]["rle"][
                                 "counts"].encode()})
    assert not np.array_equal(overlay, old), "both versions give this mask: no swap to see"
