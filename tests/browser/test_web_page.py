"""The web page at ``/`` in a real browser (Debian's chromium, headless, Playwright) against
the real stack: upload an image and click on it, and the overlay is exactly the API's mask for
the prompt the page sent; start a small training job from the page and watch its server-sent
progress reach the end; merge, evaluate and activate versions from the page and see the live
version change. Each test leaves a screenshot of its view in docs/screenshots/.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tests.browser.conftest import screenshot
from tests.service.api_support import ADMIN_KEY, make_adapter, png_bytes
from tests.workers.worker_support import write_domain_dataset

pytestmark = pytest.mark.slow

WAIT_MS = 600_000  # jobs and first encodes on 2 shared cores: generous, never a timing check
HEIGHT, WIDTH = 160, 224


def scene() -> np.ndarray:
    """A dark blotchy background with one bright rectangle (rows 40-100, columns 60-150) and a
    smaller one (blotches of 8 px keep the screenshot's PNG small)."""
    rng = np.random.default_rng(3)
    blotches = rng.integers(0, 50, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
    image = np.ascontiguousarray(blotches.repeat(8, axis=0).repeat(8, axis=1))
    image[40:100, 60:150] = (230, 200, 40)
    image[115:150, 170:210] = (60, 200, 230)
    return image


def canvas_mask(page, selector: str) -> np.ndarray:
    """The overlay canvas read back: 1 where it is painted (alpha > 0), H x W."""
    data = page.evaluate("""(selector) => {
        const canvas = document.querySelector(selector);
        const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width,
                                                            canvas.height).data;
        const alpha = new Array(canvas.width * canvas.height);
        for (let i = 0; i < alpha.length; i += 1) alpha[i] = pixels[4 * i + 3] > 0 ? 1 : 0;
        return {width: canvas.width, height: canvas.height, alpha};
    }""", selector)
    return np.array(data["alpha"], dtype=np.uint8).reshape(data["height"], data["width"])


def api_masks(client, request: dict) -> tuple[list[np.ndarray], list[float], str]:
    response = client.post("/v1/segment", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    masks = [mask_utils.decode({"size": m["rle"]["size"], "counts": m["rle"]["counts"].encode()})
             for m in body["masks"]]
    return masks, [m["score"] for m in body["masks"]], body["adapter_version"]


def page_prompt(page) -> tuple[dict, int]:
    stage = page.locator("#stage")
    return json.loads(stage.get_attribute("data-request")), int(stage.get_attribute(
        "data-mask-index"))


def assert_overlay_is_api_mask(page, client, size: tuple[int, int] = (HEIGHT, WIDTH)) -> dict:
    """The page's overlay equals the mask the API gives for the request the page sent (the
    mask the page chose; the image is ``size`` H x W); returns that request."""
    request, index = page_prompt(page)
    masks, scores, _ = api_masks(client, request)
    overlay = canvas_mask(page, "#mask-canvas")
    assert overlay.shape == masks[index].shape == size
    assert overlay.any(), "the overlay is empty"
    assert np.array_equal(overlay, masks[index]), (
        f"overlay differs from the API's mask {index} in {(overlay != masks[index]).sum()} px")
    return {"request": request, "index": index, "scores": scores, "masks": masks}


def drop_image(page, data: bytes, name: str) -> None:
    """Drop an image file on the page's drop zone, as a file manager would."""
    page.evaluate("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        document.querySelector("#drop-zone").dispatchEvent(new DragEvent("drop", {
            dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", [base64.b64encode(data).decode(), name])


def click_image(page, x: float, y: float, button: str = "left") -> None:
    """Click image pixel (x, y) (centre of the pixel) on the prompt layer."""
    box = page.locator("#prompt-layer").bounding_box()
    page.mouse.click(box["x"] + (x + 0.5) / WIDTH * box["width"],
                     box["y"] + (y + 0.5) / HEIGHT * box["height"], button=button)


def wait_done(page, count: int) -> None:
    """Wait until the page has answered prompt number ``count`` (points + box)."""
    page.wait_for_function("""(count) => {
        const stage = document.querySelector('#stage');
        if (stage.dataset.state !== 'done') return false;
        const r = JSON.parse(stage.dataset.request || '{}');
        return (r.points ? r.points.length : 0) + (r.box ? 1 : 0) === count;
    }""", arg=count, timeout=WAIT_MS)


def wait_js(page, expression: str, arg: object = None) -> None:
    """Wait until ``expression`` (JavaScript, with ``arg`` in scope) is true. A function, not
    a bare expression: the page's Content-Security-Policy forbids eval."""
    page.wait_for_function(f"(arg) => {expression}", arg=arg, timeout=WAIT_MS)


def wait_live(page, version: int) -> None:
    wait_js(page, "document.querySelector('#live-version').dataset.version === String(arg)",
            version)


def test_clicks_segment_and_the_overlay_is_the_api_mask(stack, page):
    image = png_bytes(scene())
    page.goto(stack.url + "/")
    assert page.title().startswith("regcl")
    page.set_input_files("#image-file", files=[{"name": "scene.png", "mimeType": "image/png",
                                                "buffer": image}])
    stage = page.locator("#stage")
    wait_js(page, "document.querySelector('#stage').dataset.state === 'ready'")
    with stack.client() as client:
        uploaded = client.post("/v1/images", files={"file": ("s.png", image, "image/png")})
        assert stage.get_attribute("data-image-id") == uploaded.json()["image_id"]

        # A left click: one positive point where it was clicked, overlay == API mask.
        click_image(page, 100, 70)
        wait_done(page, 1)
        first = assert_overlay_is_api_mask(page, client)
        request = first["request"]
        assert request["image_id"] == uploaded.json()["image_id"]
        assert request["labels"] == [1] and request["adapter"] == "live"
        assert np.allclose(request["points"], [[100.5, 70.5]], atol=1.0)
        assert first["index"] == int(np.argmax(first["scores"]))  # best mask shown first
        info = page.locator("#mask-info").inner_text()
        assert f"{first['scores'][first['index']]:.3f}" in info and "IoU" in info

        # Another of the multimask choices, by keyboard on the choices.
        choices = page.locator("#mask-choices [role=radio]")
        assert choices.count() == 3
        other = (first["index"] + 1) % 3
        choices.nth(first["index"]).focus()
        page.keyboard.press("ArrowRight")
        wait_js(page, "document.querySelector('#stage').dataset.maskIndex === String(arg)",
                other)
        assert choices.nth(other).get_attribute("aria-checked") == "true"
        assert np.array_equal(canvas_mask(page, "#mask-canvas"), first["masks"][other])

        # A right click adds a negative point; a drag draws a box.
        click_image(page, 180, 130, button="right")
        wait_done(page, 2)
        second = assert_overlay_is_api_mask(page, client)
        assert second["request"]["labels"] == [1, 0]
        box = page.locator("#prompt-layer").bounding_box()
        sx, sy = box["width"] / WIDTH, box["height"] / HEIGHT
        page.mouse.move(box["x"] + 55 * sx, box["y"] + 35 * sy)
        page.mouse.down()
        page.mouse.move(box["x"] + 100 * sx, box["y"] + 70 * sy, steps=4)
        page.mouse.move(box["x"] + 155 * sx, box["y"] + 105 * sy, steps=4)
        page.mouse.up()
        wait_done(page, 3)
        third = assert_overlay_is_api_mask(page, client)
        assert np.allclose(third["request"]["box"], [55, 35, 155, 105], atol=1.5)

        # Keyboard: undo, then a point at the keyboard cursor.
        stage.focus()
        page.keyboard.press("z")
        wait_done(page, 2)
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("Enter")
        wait_done(page, 3)
        keyboard = assert_overlay_is_api_mask(page, client)
        assert keyboard["request"]["labels"] == [1, 0, 1]
        assert "box" not in keyboard["request"]

        # Downloads: the COCO RLE JSON is the shown mask.
        with page.expect_download() as download:
            page.click("#download-rle")
        rle = json.loads(Path(download.value.path()).read_text())
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(decoded, canvas_mask(page, "#mask-canvas"))
        with page.expect_download() as download:
            page.click("#download-png")
        assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # Side by side with the base model.
        page.check("#compare-toggle")
        wait_js(page, "!document.querySelector('#pane-compare').hidden && "
                "document.querySelector('#compare-stage').dataset.adapterVersion === 'base'")
        wait_done(page, 3)
        compare = canvas_mask(page, "#compare-mask-canvas")
        request, index = page_prompt(page)
        base_masks, _, label = api_masks(client, {**request, "adapter": "base"})
        assert label == "base" and np.array_equal(compare, base_masks[index])
    screenshot(page, "segment")


def dataset_zip(root: Path, domain: str, count: int) -> bytes:
    folder = write_domain_dataset(root / domain, domain, count)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(folder.rglob("*.png")):
            zf.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def use_admin_key(page) -> None:
    page.fill("#admin-key", ADMIN_KEY)
    page.press("#admin-key", "Enter")
    wait_js(page, "document.querySelector('#key-state').textContent.includes('set')")


def test_training_started_from_the_page_streams_progress_to_the_end(stack, page, tmp_path):
    page.goto(stack.url + "/")
    page.click("#tab-manage")
    use_admin_key(page)
    assert page.evaluate("sessionStorage.getItem('regcl.adminKey')") == ADMIN_KEY

    page.fill("#dataset-name", "polyp-data")
    page.fill("#dataset-domain", "polyp")
    page.set_input_files("#dataset-file", files=[{
        "name": "polyp.zip", "mimeType": "application/zip",
        "buffer": dataset_zip(tmp_path, "polyp", 6)}])
    page.click("#dataset-upload")
    page.wait_for_selector("#datasets-table tr[data-dataset='polyp-data']")
    assert page.input_value("#train-dataset") == "polyp-data"
    assert page.input_value("#train-domain") == "polyp"

    page.fill("#train-adapter", "polyp-page")
    page.fill("#train-epochs", "2")
    page.fill("#train-rank", "2")
    page.fill("#train-batch", "2")
    page.click("#train-button")
    row = page.locator("#jobs-table tr[data-kind='train']")
    row.wait_for()
    wait_js(page, "document.querySelector(\"#jobs-table tr[data-kind='train']\")"
            ".dataset.state === 'succeeded'")
    job_id = row.get_attribute("data-job-id")
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", stack.logs()
    sent = {"adapter": "polyp-page", "epochs": 2, "rank": 2, "batch_size": 2}
    assert {k: job["params"]["params"][k] for k in sent} == sent
    # The step and loss came over the event stream: the last training step is shown.
    step = row.locator("td.step").inner_text()
    done, total = (int(v) for v in step.split("/"))
    assert done == total > 0
    assert float(row.locator("td.loss").inner_text()) > 0
    assert "100%" in row.inner_text()
    adapter = page.locator("#adapters-table tr[data-adapter='polyp-page']")
    adapter.wait_for()
    assert "polyp" in adapter.inner_text()
    iou = job["result"]["metrics"]["holdout"]["iou"]
    assert f"{iou:.3f}" in adapter.inner_text()
    # A long job can be cancelled from its row.
    page.fill("#train-adapter", "polyp-long")
    page.fill("#train-epochs", "500")
    page.click("#train-button")
    long_row = page.locator("#jobs-table tr[data-kind='train']").first
    wait_js(page, "document.querySelector(\"#jobs-table tr[data-kind='train']\").dataset"
            ".jobId !== arg", job_id)
    long_row.locator("button.cancel").click()
    wait_js(page, "document.querySelector(\"#jobs-table tr[data-kind='train']\").dataset"
            ".state === 'cancelled'")
    page.wait_for_selector("#adapters-table tr[data-adapter='polyp-page']")
    assert page.locator("#adapters-table tr[data-adapter='polyp-long']").count() == 0

    # The new adapter can be picked in the segment view, and answers as itself.
    page.click("#tab-segment")
    page.wait_for_selector("#adapter-select option[value='polyp-page']", state="attached")
    page.select_option("#adapter-select", "polyp-page")
    page.set_input_files("#image-file", files=[{"name": "scene.png", "mimeType": "image/png",
                                                "buffer": png_bytes(scene())}])
    wait_js(page, "document.querySelector('#stage').dataset.state === 'ready'")
    click_image(page, 100, 70)
    wait_done(page, 1)
    assert page.locator("#stage").get_attribute("data-adapter-version") == "domain:polyp-page"
    with stack.client() as client:
        assert assert_overlay_is_api_mask(page, client)["request"]["adapter"] == "polyp-page"
    page.click("#tab-manage")
    page.locator("#h-datasets").scroll_into_view_if_needed()
    screenshot(page, "domains-jobs")


def upload_adapter(client, tmp_path: Path, name: str, seed: int) -> None:
    directory = make_adapter(tmp_path / name, seed=seed)
    files = {part: (file, (directory / file).read_bytes()) for part, file in (
        ("adapter_config", "adapter_config.json"),
        ("adapter_model", "adapter_model.safetensors"),
        ("regcl_stats", "regcl_stats.safetensors"))}
    response = client.post("/v1/adapters", data={"name": name, "domain": name}, files=files)
    assert response.status_code == 201, response.text


def test_merge_evaluate_and_activate_versions_from_the_page(stack, page, tmp_path):
    with stack.client() as client:
        upload_adapter(client, tmp_path, "shadow-a", seed=1)
        upload_adapter(client, tmp_path, "skin-b", seed=2)
        response = client.post("/v1/datasets", data={
            "name": "shadow-data", "metadata": json.dumps({"domain": "shadow"})}, files={
            "file": ("s.zip", dataset_zip(tmp_path, "shadow", 4), "application/zip")})
        assert response.status_code == 201, response.text
        before = {v["number"] for v in client.get("/v1/versions").json()["versions"]}

    page.goto(stack.url + "/#manage")
    use_admin_key(page)

    def merge(names: list[str]) -> int:
        for name in names:
            page.check(f"#adapters-table input[value='{name}']")
        count = page.locator("#jobs-table tr[data-kind='merge']").count()
        page.click("#merge-button")
        page.wait_for_function(f"""() => {{
            const rows = document.querySelectorAll("#jobs-table tr[data-kind='merge']");
            return rows.length > {count} &&
                ['succeeded', 'failed', 'cancelled'].includes(rows[0].dataset.state);
        }}""", timeout=WAIT_MS)
        for name in names:
            page.uncheck(f"#adapters-table input[value='{name}']")
        with stack.client() as client:
            job_id = page.locator("#jobs-table tr[data-kind='merge']").first.get_attribute(
                "data-job-id")
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["state"] == "succeeded", (job["error"], stack.logs())
            return job["result"]["version"]

    page.wait_for_selector("#adapters-table input[value='skin-b']")
    first = merge(["shadow-a"])
    second = merge(["skin-b"])
    assert first not in before and second == first + 1
    row = page.locator(f"#versions-table tr[data-version='{second}']")
    row.wait_for()
    assert f"v{first}" in row.inner_text() and "shadow-a" in row.inner_text()

    # Evaluate both versions and the base model: the heat map fills in.
    page.click("#evaluate-base")
    for number in (first, second):
        page.click(f"#versions-table tr[data-version='{number}'] button.evaluate")
    page.wait_for_function("""(targets) => targets.every((t) => document.querySelector(
        `#matrix-table tr[data-target='${t}'] td[data-iou]`))""",
                           arg=["base", f"version:{first}", f"version:{second}"],
                           timeout=WAIT_MS)
    with stack.client() as client:
        matrix = client.get("/v1/versions/matrix").json()
    for target in ("base", f"version:{first}", f"version:{second}"):
        scores = next(r for r in matrix["rows"] if r["target"] == target)["scores"]
        expected = [scores[c["dataset"]]["iou"] for c in matrix["columns"]
                    if c["dataset"] in scores]
        shown = page.locator(f"#matrix-table tr[data-target='{target}'] td[data-iou]")
        assert [float(v) for v in shown.evaluate_all("cells => cells.map("
                                                     "c => c.dataset.iou)")] == expected
    assert "shadow" in page.locator("#matrix-table thead").inner_text()

    # Activate the newer version, then roll back: the header follows.
    live = page.locator("#live-version")
    page.click(f"#versions-table tr[data-version='{second}'] button.activate")
    wait_live(page, second)
    assert live.inner_text().startswith(f"v{second}")
    rollback = page.locator(f"#versions-table tr[data-version='{first}'] button.activate")
    assert rollback.inner_text() == f"Roll back to v{first}"
    rollback.click()
    wait_live(page, first)
    with stack.client() as client:
        assert client.get("/v1/versions/live").json()["served_version"] == first
        # Activated elsewhere (another client): the page notices by itself.
        response = client.post(f"/v1/versions/{second}/activate")
        assert response.status_code == 200, response.text
    wait_live(page, second)
    page.wait_for_selector(f"#versions-table tr.live[data-version='{second}']",
                           timeout=WAIT_MS)
    page.wait_for_selector(f"#matrix-table tr.live[data-target='version:{second}']",
                           timeout=WAIT_MS)
    page.locator("#h-versions").scroll_into_view_if_needed()
    page.evaluate("window.scrollBy(0, -60)")
    screenshot(page, "versions")
    screenshot(page, "matrix", "section[aria-labelledby='h-matrix']")

    # The segment view now answers 'live' with that version, next to the base model; this
    # time the image is dropped on the page.
    page.click("#tab-segment")
    drop_image(page, png_bytes(scene()), "scene.png")
    wait_js(page, "document.querySelector('#stage').dataset.state === 'ready'")
    page.check("#compare-toggle")
    click_image(page, 100, 70)
    wait_done(page, 1)
    wait_js(page, "document.querySelector('#compare-stage').dataset.adapterVersion === 'base'")
    assert page.locator("#stage").get_attribute("data-adapter-version") == f"live:{second}"
    assert page.locator("#main-caption").inner_text() == f"live (live:{second})"
    with stack.client() as client:
        assert_overlay_is_api_mask(page, client)
    screenshot(page, "segment-live-vs-base")


def test_the_pages_rle_decoder_agrees_with_pycocotools(stack, page):
    """The overlay is decoded in the browser (service/static/js/rle.js): random masks, runs
    longer than any 5-bit chunk, empty and full masks, a large image."""
    rng = np.random.default_rng(0)
    masks = [(rng.random((h, w)) < rng.random()).astype(np.uint8)
             for h, w in rng.integers(1, 60, (40, 2))]
    masks += [np.zeros((7, 9), np.uint8), np.ones((9, 7), np.uint8)]
    big = np.zeros((700, 900), np.uint8)
    big[100:650, 40:880] = 1
    big[300:310, 500:520] = 0
    masks.append(big)
    cases = []
    for mask in masks:
        rle = mask_utils.encode(np.asfortranarray(mask))
        cases.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()})
    page.goto(stack.url + "/")
    decoded = page.evaluate("""async (cases) => {
        const { rleToMask } = await import("/ui/js/rle.js");
        return cases.map((rle) => rleToMask(rle).join(""));
    }""", cases)
    for mask, got in zip(masks, decoded, strict=True):
        pixels = np.frombuffer(got.encode(), dtype=np.uint8) - ord("0")
        assert np.array_equal(pixels.reshape(mask.shape), mask)


def test_a_jpeg_with_exif_rotation_is_shown_as_the_server_segments_it(stack, page):
    """The server ignores EXIF orientation (masks are drawn on the stored pixels); the page must
    show those same pixels, or its masks would not line up with the picture."""
    from PIL import Image

    stored = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    stored[:, : WIDTH // 2] = (220, 30, 30)  # left half red, right half blue, as stored
    stored[:, WIDTH // 2 :] = (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif)
    page.goto(stack.url + "/")
    drop_image(page, buffer.getvalue(), "rotated.jpg")
    wait_js(page, "document.querySelector('#stage').dataset.state === 'ready'")
    shown = page.evaluate("""() => {
        const canvas = document.querySelector('#image-canvas');
        const pixel = (x, y) => Array.from(canvas.getContext('2d').getImageData(x, y, 1, 1).data);
        return [canvas.width, canvas.height, pixel(20, 20), pixel(20, 140), pixel(200, 20)];
    }""")
    width, height, top_left, bottom_left, top_right = shown
    assert (width, height) == (WIDTH, HEIGHT)
    for pixel in (top_left, bottom_left):  # rotated, the top row would be half red, half blue
        assert pixel[0] > 150 and pixel[2] < 100, shown
    assert top_right[2] > 150 and top_right[0] < 100, shown
    assert "EXIF" not in page.locator("#segment-status").inner_text()
