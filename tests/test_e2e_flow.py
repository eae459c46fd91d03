"""The whole product, end to end: the stack started as a user starts it (``regcl up``: a real
redis-server, a real Celery worker and the real uvicorn API, each its own process) and driven
only over HTTP: upload a dataset → train an adapter (progress streamed) → merge it with RegCL
and activate → ``live`` now answers as version 1 with other masks than the base model. Then
``regcl demo`` (:func:`service.demo.run_demo`) runs the same flow against the same stack.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from regcl.data.domains import domain_split
from service.demo import prompt_points, run_demo
from tests.conftest import free_tcp_port

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "e2e-admin-key-0123456789abcdef"
DOMAIN = "polyp"
ADAPTER = "e2e-polyp"
TRAIN_PARAMS = {"adapter": ADAPTER, "epochs": 2, "rank": 4, "batch_size": 4}
START_TIMEOUT_S = 600.0
JOB_TIMEOUT_S = 900.0  # generous: 2 shared cores
VERSION_HEADER = "X-Regcl-Adapter-Version"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _domain_zip(count: int) -> bytes:
    """``count`` training samples of DOMAIN as a zip of images/ + masks/ PNG pairs."""
    images, masks = domain_split(DOMAIN, "train", count)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(count):
            zf.writestr(f"images/{i}.png", _png(images[i].permute(1, 2, 0).to(torch.uint8)
                                                .numpy()))
            zf.writestr(f"masks/{i}.png", _png(masks[i].numpy().astype(np.uint8) * 255))
    return buffer.getvalue()


class Stack:
    """``regcl up`` in a subprocess (its own session, like a terminal's foreground job) on a
    temporary data directory and free ports; its output collected line by line."""

    def __init__(self, data_dir: Path) -> None:
        self.redis_port, self.api_port = free_tcp_port(), free_tcp_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGCL_")}
        env.update({
            "REGCL_DATA_DIR": str(data_dir), "REGCL_REDIS_PORT": str(self.redis_port),
            "REGCL_API_PORT": str(self.api_port), "REGCL_ADMIN_KEYS": ADMIN_KEY,
            "REGCL_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "regcl.cli", "up"], env=env, cwd=REPO, text=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def tail(self, count: int = 80) -> str:
        return "\n".join(self.lines[-count:])

    def wait_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any("regcl is up" in line for line in list(self.lines)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"regcl up did not come up:\n{self.tail()}")
            time.sleep(0.5)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120.0,
                            headers={"Authorization": f"Bearer {ADMIN_KEY}"})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    up = Stack(tmp_path_factory.mktemp("e2e") / "data")
    try:
        up.wait_up()
        yield up
    finally:
        code = up.stop()
    assert code == 0, f"regcl up exited with {code}:\n{up.tail()}"


@pytest.fixture(scope="module")
def held_out() -> tuple[str, list[list[float]]]:
    """A test-split image of DOMAIN (base64 PNG) and three foreground points on its object."""
    images, masks = domain_split(DOMAIN, "test", 1)
    image = images[0].permute(1, 2, 0).to(torch.uint8).numpy()
    return base64.b64encode(_png(image)).decode(), prompt_points(masks[0].numpy())


def _segment(client: httpx.Client, image: str, points: list[list[float]], adapter: str
             ) -> tuple[str, dict[str, Any], np.ndarray]:
    """(version label, first mask, its low-res logits); body and header must agree."""
    response = client.post("/v1/segment", json={
        "image_base64": image, "points": points, "labels": [1] * len(points),
        "multimask": False, "adapter": adapter, "return_logits": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers[VERSION_HEADER] == body["adapter_version"]
    mask = body["masks"][0]
    return body["adapter_version"], mask, np.frombuffer(
        base64.b64decode(mask["low_res_logits"]), dtype="<f4")


def _follow_events(stack: Stack, client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """The job's server-sent events until it ends: (event name, data)."""
    events: list[tuple[str, dict]] = []
    name, data = "message", []
    timeout = httpx.Timeout(120.0, read=JOB_TIMEOUT_S)
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and data:
                events.append((name, json.loads("\n".join(data))))
                name, data = "message", []
    assert events, f"no events for job {job_id}:\n{stack.tail()}"
    return events


def _wait_job(stack: Stack, client: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not finish:\n{stack.tail()}")


def _wait_served(client: httpx.Client, version: int) -> None:
    deadline = time.monotonic() + 120.0
    while client.get("/v1/versions/live").json()["served_version"] != version:
        assert time.monotonic() < deadline, f"the API never served version {version}"
        time.sleep(0.2)


@pytest.mark.slow
def test_upload_train_merge_activate_segment_over_http(stack, held_out):
    image, points = held_out
    with stack.client() as client:
        assert client.get("/readyz").json()["status"] == "ready"
        response = client.post("/v1/datasets", data={"name": "e2e-polyp-data"},
                               files={"file": ("polyp.zip", _domain_zip(8), "application/zip")})
        assert response.status_code == 201, response.text
        assert (response.json()["format"], response.json()["count"]) == ("folders", 8)

        base_label, base_mask, base_logits = _segment(client, image, points, "base")
        assert base_label == "base"
        label, _, logits = _segment(client, image, points, "live")
        assert label == "base" and np.array_equal(logits, base_logits)  # nothing live yet

        response = client.post("/v1/jobs/train", json={
            "dataset": "e2e-polyp-data", "domain": DOMAIN, "params": TRAIN_PARAMS})
        assert response.status_code == 202, response.text
        job_id = response.json()["job"]["id"]
        assert response.headers["Location"] == f"/v1/jobs/{job_id}"
        events = _follow_events(stack, client, job_id)
        final = events[-1][1]["job"]
        assert final["state"] == "succeeded", (final, stack.tail())
        steps = [data["job"]["detail"] for name, data in events if name == "progress"
                 and data["job"]["detail"].get("phase") == "train"
                 and data["job"]["detail"].get("step")]
        assert steps, f"no training progress among {[name for name, _ in events]}"
        assert steps[-1]["step"] == steps[-1]["total"] == 2 * 2  # 7 samples / 4, 2 epochs
        result = final["result"]
        assert result["adapter"] == ADAPTER and result["samples"]["train"] == 7
        assert len(result["metrics"]["train"]) == TRAIN_PARAMS["epochs"]
        assert client.get(f"/v1/adapters/{ADAPTER}").json()["has_stats"] is True

        label, _, logits = _segment(client, image, points, "live")
        assert label == "base" and np.array_equal(logits, base_logits)  # trained, not live

        response = client.post("/v1/jobs/merge", json={
            "adapters": [ADAPTER], "method": "regcl", "activate": True})
        assert response.status_code == 202, response.text
        merge = _wait_job(stack, client, response.json()["job"]["id"])
        assert merge["state"] == "succeeded", (merge, stack.tail())
        assert merge["result"]["version"] == 1 and merge["result"]["activated"] is True
        assert client.get("/v1/versions/live").json()["live_version"] == 1
        assert client.get("/v1/versions/1").json()["lineage"]["domains"] == [ADAPTER]
        _wait_served(client, 1)

        label, live_mask, live_logits = _segment(client, image, points, "live")
        assert label == "live:1"
        assert not np.allclose(live_logits, base_logits, atol=1e-4)
        assert (live_mask["score"] != base_mask["score"]
                or live_mask["rle"] != base_mask["rle"])
        label, _, logits = _segment(client, image, points, "base")
        assert label == "base" and np.array_equal(logits, base_logits)  # base is untouched


@pytest.mark.slow
def test_the_demo_runs_against_the_stack(stack):
    with stack.client() as client:
        before = client.get("/v1/versions/live").json()["live_version"] or 0
    out, err = io.StringIO(), io.StringIO()
    # No rank: the demo takes that of the adapters merged so far (its adapter is folded into
    # their merge state, so the layouts must match).
    code = run_demo(stack.url, ADMIN_KEY, domain=DOMAIN, train_images=8, epochs=1, out=out,
                    err=err)
    text = out.getvalue()
    assert code == 0, f"{text}\n{err.getvalue()}\n{stack.tail()}"
    with stack.client() as client:
        live = client.get("/v1/versions/live").json()
        lineage = client.get(f"/v1/versions/{before + 1}").json()["lineage"]
    version = before + 1
    assert live["live_version"] == live["served_version"] == version
    if before:  # folded onto the earlier version's state with its method: its domains stay
        assert ADAPTER in lineage["domains"] and len(lineage["domains"]) == 2, lineage
        assert lineage["method"] == "regcl" and lineage["parent"] == before
    assert f"live:{version}" in text and f"version {version} is live" in text
    assert f"LoRA rank {TRAIN_PARAMS['rank']}" in text
    assert "held-out IoU" in text and "step" in text  # results and training progress shown


def test_the_demo_says_how_to_start_a_stack_that_is_not_running():
    out, err = io.StringIO(), io.StringIO()
    code = run_demo(f"http://127.0.0.1:{free_tcp_port()}", ADMIN_KEY, out=out, err=err)
    assert code == 1
    assert "regcl up" in err.getvalue() and "cannot reach" in err.getvalue()


def test_the_demo_needs_an_admin_key_and_a_known_domain():
    err = io.StringIO()
    assert run_demo("http://127.0.0.1:1", "", out=io.StringIO(), err=err) == 2
    assert "admin key" in err.getvalue()
    err = io.StringIO()
    assert run_demo("http://127.0.0.1:1", ADMIN_KEY, domain="mars", out=io.StringIO(),
                    err=err) == 2
    assert "unknown domain 'mars'" in err.getvalue()
