"""The whole product, end to end: the stack started as a user starts it (``regcl up``: a real
redis-server, a real Celery worker and the real uvicorn API, each its own process) and driven
only over HTTP through the library's client (:class:`regcl.client.Client`): upload a dataset →
train an adapter (progress streamed) → merge it with RegCL and activate → ``live`` now answers
as version 1 with other masks than the base model. Then ``regcl demo`` (``python -m cli demo``)
runs the same flow against the same stack.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli.demo import prompt_points, run_demo
from regcl.client import Client, JobEvent, Segmentation
from regcl.data.domains import domain_split
from tests.conftest import free_tcp_port

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "e2e-admin-key-0123456789abcdef"
DOMAIN = "polyp"
ADAPTER = "e2e-polyp"
TRAIN_PARAMS = {"adapter": ADAPTER, "epochs": 2, "rank": 4, "batch_size": 4}
START_TIMEOUT_S = 600.0
JOB_TIMEOUT_S = 900.0  # generous: 2 shared cores


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
            [sys.executable, "-m", "cli", "up"], env=env, cwd=REPO, text=True,
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

    def client(self) -> Client:
        return Client(self.url, ADMIN_KEY)


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
def held_out() -> tuple[np.ndarray, list[list[float]]]:
    """A test-split image of DOMAIN (H x W x 3 uint8) and three foreground points on its
    object."""
    images, masks = domain_split(DOMAIN, "test", 1)
    image = images[0].permute(1, 2, 0).to(torch.uint8).numpy()
    return image, prompt_points(masks[0].numpy())


def _segment(client: Client, image: np.ndarray, points: list[list[float]], adapter: str
             ) -> Segmentation:
    """One mask with its low-res logits (the client checks that body and header agree)."""
    return client.segment(image, points=points, multimask=False, adapter=adapter,
                          return_logits=True)


def _train_steps(events: list[JobEvent]) -> list[dict]:
    return [e.job.detail for e in events if e.event == "progress"
            and e.job.detail.get("phase") == "train" and e.job.detail.get("step")]


@pytest.mark.slow
def test_upload_train_merge_activate_segment_over_http(stack, held_out):
    image, points = held_out
    with stack.client() as client:
        assert client.ready().ready
        dataset = client.upload_dataset("e2e-polyp-data", _domain_zip(8))
        assert (dataset.format, dataset.count) == ("folders", 8)

        base = _segment(client, image, points, "base")
        assert base.adapter_version == "base"
        live = _segment(client, image, points, "live")
        assert live.adapter_version == "base"  # nothing live yet
        assert np.array_equal(live.masks[0].low_res_logits, base.masks[0].low_res_logits)

        job = client.submit_train("e2e-polyp-data", DOMAIN, **TRAIN_PARAMS)
        # the answer is read after the job is sent: an idle worker may have started it already
        assert job.kind == "train" and job.state in ("queued", "running")
        events = list(client.events(job))
        assert events and events[0].event == "snapshot", stack.tail()
        final = events[-1].job
        assert final.state == "succeeded", (final, stack.tail())
        steps = _train_steps(events)
        assert steps, f"no training progress among {[e.event for e in events]}"
        assert steps[-1]["step"] == steps[-1]["total"] == 2 * 2  # 7 samples / 4, 2 epochs
        result = final.result
        assert result["adapter"] == ADAPTER and result["samples"]["train"] == 7
        assert len(result["metrics"]["train"]) == TRAIN_PARAMS["epochs"]
        assert client.get_adapter(ADAPTER).has_stats is True

        live = _segment(client, image, points, "live")
        assert live.adapter_version == "base"  # trained, not live
        assert np.array_equal(live.masks[0].low_res_logits, base.masks[0].low_res_logits)

        merge = client.submit_merge([ADAPTER], method="regcl", activate=True)
        merge = client.wait(merge, JOB_TIMEOUT_S)
        assert merge.state == "succeeded", (merge, stack.tail())
        assert merge.result["version"] == 1 and merge.result["activated"] is True
        assert client.live_version().live_version == 1
        assert client.get_version(1).lineage["domains"] == [ADAPTER]
        client.wait_served(1, timeout=120.0)

        live = _segment(client, image, points, "live")
        assert live.adapter_version == "live:1"
        base_mask, live_mask = base.masks[0], live.masks[0]
        assert not np.allclose(live_mask.low_res_logits, base_mask.low_res_logits, atol=1e-4)
        assert (live_mask.score != base_mask.score
                or not np.array_equal(live_mask.mask, base_mask.mask))
        again = _segment(client, image, points, "base")
        assert again.adapter_version == "base"  # base is untouched
        assert np.array_equal(again.masks[0].low_res_logits, base_mask.low_res_logits)


@pytest.mark.slow
def test_the_demo_runs_against_the_stack(stack):
    """``python -m cli demo`` (the ``regcl demo`` command itself) against the stack."""
    with stack.client() as client:
        before = client.live_version().live_version or 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGCL_")}
    # No rank: the demo takes that of the adapters merged so far (its adapter is folded into
    # their merge state, so the layouts must match).
    result = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--url", stack.url, "--admin-key", ADMIN_KEY,
         "--domain", DOMAIN, "--train-images", "8", "--epochs", "1"],
        cwd=REPO, env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    text = result.stdout
    assert result.returncode == 0, f"{text}\n{result.stderr}\n{stack.tail()}"
    version = before + 1
    with stack.client() as client:
        live = client.live_version()
        lineage = client.get_version(version).lineage
    assert live.live_version == live.served_version == version
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
