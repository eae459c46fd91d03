"""The page's adapter menu with ``auto`` in a real browser against the real stack: an image of
a registered domain is served by that domain's adapter and the page says so, with the router's
margin; an image from nowhere falls back to the live adapter and the page says why. The
overlay is the API's mask for the request the page sent.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.browser.conftest import screenshot
from tests.browser.test_web_page import (
    WAIT_MS,
    assert_overlay_is_api_mask,
    page_prompt,
    wait_js,
)
from tests.service.api_support import png_bytes
from tests.service.auto_support import SIZE, domain_image, nowhere

pytestmark = pytest.mark.slow

DOMAINS = ("polyp", "camo_pattern")


@pytest.fixture(scope="module")
def domains(stack, domain_adapter):
    """Two statistics-only domain adapters in the stack's registry (removed afterwards)."""
    with stack.client() as client:
        # The session's stack keeps what earlier modules registered (test_web_page.py trains
        # "polyp-page" on polyp images): two adapters of one domain leave the router no margin
        # (by design: it falls back to live), so this module's router holds its own two only.
        for record in client.get("/v1/adapters").json()["adapters"]:
            if record["name"] not in {f"page-{n}" for n in DOMAINS}:
                assert client.delete(f"/v1/adapters/{record['name']}").status_code == 200
        for name in DOMAINS:
            directory = domain_adapter(name)
            files = {field: (file, (directory / file).read_bytes())
                     for field, file in (("adapter_config", "adapter_config.json"),
                                         ("adapter_model", "adapter_model.safetensors"),
                                         ("regcl_stats", "regcl_stats.safetensors"))}
            response = client.post("/v1/adapters", data={"name": f"page-{name}"}, files=files)
            assert response.status_code == 201, response.text
        deadline = time.monotonic() + 120
        while {d["name"] for d in client.get("/v1/router").json()["domains"]} < {
                f"page-{n}" for n in DOMAINS}:
            assert time.monotonic() < deadline, client.get("/v1/router").text
            time.sleep(0.2)
    yield [f"page-{n}" for n in DOMAINS]
    with stack.client() as client:
        for name in DOMAINS:
            client.delete(f"/v1/adapters/page-{name}")


def open_and_click(page, image: np.ndarray, name: str) -> None:
    page.set_input_files("#image-file", files=[{"name": name, "mimeType": "image/png",
                                                "buffer": png_bytes(image)}])
    wait_js(page, "document.querySelector('#stage').dataset.state === 'ready' && "
                  "document.querySelector('#stage').dataset.imageId")
    box = page.locator("#prompt-layer").bounding_box()
    height, width = image.shape[:2]
    page.mouse.click(box["x"] + 128.5 / width * box["width"],
                     box["y"] + 128.5 / height * box["height"])
    page.wait_for_function("() => document.querySelector('#stage').dataset.state === 'done'",
                           timeout=WAIT_MS)


def test_auto_in_the_menu_shows_the_chosen_adapter_and_its_confidence(stack, page, domains):
    page.goto(stack.url + "/")
    page.wait_for_selector(f"#adapter-select option[value='{domains[0]}']", state="attached")
    page.select_option("#adapter-select", "auto")
    stage = page.locator("#stage")
    with stack.client() as client:
        open_and_click(page, domain_image("polyp", 1), "polyp.png")
        shown = assert_overlay_is_api_mask(page, client, size=(SIZE, SIZE))
        assert shown["request"]["adapter"] == "auto"
        route = client.post("/v1/segment", json=shown["request"]).json()["route"]
        assert route["domain"] == "page-polyp" and route["confident"]
        assert stage.get_attribute("data-adapter-version") == "domain:page-polyp"
        assert stage.get_attribute("data-route") == "page-polyp"
        info = page.locator("#route-info").inner_text()
        assert info.startswith("auto → domain:page-polyp: confident")
        assert f"margin {route['margin']:.3f}" in info
        assert page.locator("#main-caption").inner_text() == "auto (domain:page-polyp)"
        screenshot(page, "segment-auto")

        open_and_click(page, nowhere(), "noise.png")
        request, _ = page_prompt(page)
        route = client.post("/v1/segment", json=request).json()["route"]
        assert not route["confident"] and route["domain"] is None
        live = client.get("/v1/versions/live").json()["adapter_version"]
        assert stage.get_attribute("data-adapter-version") == live
        assert stage.get_attribute("data-route") == "live"
        info = page.locator("#route-info").inner_text()
        assert info.startswith(f"auto → {live}: not confident (best: {route['best']})")
        assert f"novelty {route['novelty']:.3f}" in info

