"""Real SAM through the whole service: ``vit_b`` on the CPU.

Official SAM checkpoints are ``torch.save``d state dicts (``sam_vit_b_01ec64.pth``). They
cannot be downloaded here, so one is written the same way at test time: segment-anything's
own ``build_sam_vit_b()`` with seeded random weights, ``torch.save(model.state_dict(), path)``.
With ``REGCL_MODEL=vit_b REGCL_CHECKPOINT=<it>``, through a real redis-server, a real Celery
worker and the real uvicorn API:

upload a dataset of two non-square images (1280 x 720 and 600 x 900) with masks → train the
default adapter (rank 10 on blocks 7-11 of 12) for one step → compute Gram statistics on a
calibration image (stats job) → merge that adapter and activate it → segment with points and
with a box at each image's own resolution. Checks: masks come back at the image's size; the
base model's answers equal segment-anything's ``SamPredictor`` on the same weights, and the
live version's equal ``SamPredictor`` on PEFT's merged model (``merge_and_unload`` of the
version's adapter on the same Sam); the adapter is 12-block-shaped. Every step's time and the
peak resident memory of the worker, the API and this process are printed (``pytest -s``), and
the worker logs each job phase's time and peak memory.

vit_b encodes an image in about 16 s on 2 quiet cores, so the counts are minimal (2 images,
1 training step, 1 calibration image, 2 encodes in the API and 2 here): about two minutes on a
quiet machine, longer on a loaded one (docs/deploy.md). Part of ``make test``; alone:
``make test-vit-b``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from segment_anything import SamPredictor, build_sam_vit_b

from infra.redis_client import connect
from infra.registry import Registry
from regcl.client import Segmentation
from regcl.models import build_sam
from tests.deploy.support import Deployment, client_of, say, wait_job, wait_served
from tests.service.api_support import png_bytes

THREADS = "2"  # the processes work one after the other; each may use both cores
PROCESS_ENV = {"REGCL_TORCH_THREADS": THREADS, "OMP_NUM_THREADS": THREADS,
               "MKL_NUM_THREADS": THREADS, "REGCL_SERVE_THREADS": THREADS}
API_ENV = {"REGCL_MAX_UPLOAD_BYTES": str(64 * 2**20),
           "REGCL_EMBEDDING_CACHE_BYTES": str(64 * 2**20)}
LANDSCAPE, PORTRAIT = (720, 1280), (900, 600)  # (height, width)
POINTS = {LANDSCAPE: [[640.0, 360.0], [300.0, 150.0]], PORTRAIT: [[300.0, 450.0], [80.0, 90.0]]}
BOXES = {LANDSCAPE: [420.0, 200.0, 860.0, 520.0], PORTRAIT: [150.0, 250.0, 450.0, 650.0]}


def scene(size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An H x W x 3 uint8 image (smooth background, one ellipse) and its H x W bool mask."""
    h, w = size
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    image = np.stack([xs * 200 // w, ys * 200 // h, np.full((h, w), 60)], -1).astype(np.uint8)
    mask = ((xs - w / 2) / (w / 5)) ** 2 + ((ys - h / 2) / (h / 5)) ** 2 <= 1
    image[mask] = rng.integers(150, 255, 3, dtype=np.uint8)
    return image, mask


def dataset_zip(scenes: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, (image, mask) in scenes.items():
            zf.writestr(f"images/{name}.png", png_bytes(image))
            zf.writestr(f"masks/{name}.png", png_bytes(mask.astype(np.uint8) * 255))
    return buffer.getvalue()


class Meter:
    """Wall time of each step and the peak RSS of each process during it (Linux: the peak is
    reset through ``/proc/<pid>/clear_refs`` before the step, read from ``VmHWM`` after)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.rows: list[tuple[str, float, dict[str, float]]] = []

    @staticmethod
    def _hwm(pid: int) -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        for pid in self.pids.values():
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")
        start = time.monotonic()
        yield
        seconds = time.monotonic() - start
        self.rows.append((name, seconds, {k: self._hwm(p) for k, p in self.pids.items()}))
        say(f"{name}: {seconds:.1f} s")

    def table(self) -> str:
        names = list(self.pids)
        lines = [f"| step | s | {' | '.join(f'peak RSS {n} (MiB)' for n in names)} |",
                 "|---|---|" + "---|" * len(names)]
        for step, seconds, peaks in self.rows:
            lines.append(f"| {step} | {seconds:.1f} | " + " | ".join(
                f"{peaks[n]:.0f}" if n in peaks else "-" for n in names) + " |")
        return "\n".join(lines)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vit_b checkpoint written as the official ones are, with seeded random weights."""
    path = tmp_path_factory.mktemp("vit_b") / "sam_vit_b_random.pth"
    torch.manual_seed(0)
    sam = build_sam_vit_b()
    torch.save(sam.state_dict(), path)
    return path


@pytest.fixture
def vit_b(tmp_path: Path, checkpoint: Path) -> Iterator[Deployment]:
    stack = Deployment(tmp_path, env=PROCESS_ENV, model="vit_b", checkpoint=checkpoint)
    try:
        yield stack
    finally:
        stack.close()


def check_parity(result: Segmentation, predictor: SamPredictor, size: tuple[int, int],
                 prompt: dict) -> dict[str, float]:
    """The service's answer against SamPredictor's for the same prompt; the differences."""
    masks, scores, low_res = predictor.predict(
        point_coords=np.array(prompt["points"]) if "points" in prompt else None,
        point_labels=np.array(prompt["labels"]) if "labels" in prompt else None,
        box=np.array(prompt["box"]) if "box" in prompt else None,
        multimask_output=prompt["multimask"])
    got = np.stack([m.mask for m in result.masks])
    assert got.shape == masks.shape == (len(masks), *size)  # at the image's own size
    logits = np.stack([m.low_res_logits for m in result.masks])
    return {"mask_pixels_differing": float((got != masks).mean()),
            "score_diff": float(np.abs(np.array([m.score for m in result.masks])
                                       - scores).max()),
            "logit_diff": float(np.abs(logits - low_res).max())}


@pytest.mark.slow
def test_vit_b_upload_train_stats_merge_activate_segment(vit_b: Deployment, checkpoint: Path
                                                          ) -> None:
    scenes = {"wide": scene(LANDSCAPE, 1), "tall": scene(PORTRAIT, 2)}
    worker = vit_b.start_worker("worker")  # logs each job phase's time and peak RSS itself
    meter = Meter({"test": os.getpid()})
    with meter.step("API start (loads vit_b)"):
        api = vit_b.start_api(**API_ENV)
    meter.pids["api"] = api.process.pid
    with client_of(api) as client:
        with meter.step("upload dataset (2 images)"):
            assert client.upload_dataset("shapes", dataset_zip(scenes)).count == 2
        with meter.step("train job (1 step)"):
            train = wait_job(vit_b, client, client.submit_train(
                "shapes", "shapes", epochs=1, batch_size=1))  # default adapter: rank 10
        assert train.result["samples"] == {"train": 1, "holdout": 1, "dropped": 0}
        with meter.step("stats job (1 image)"):
            stats = wait_job(vit_b, client, client.submit_stats(
                "shapes", "shapes", params={"max_samples": 1, "batch_size": 1}))
        assert stats.result["adapter"] == "shapes-stats"
        with meter.step("merge job + activate"):
            merge = wait_job(vit_b, client, client.submit_merge(["shapes-stats"],
                                                                activate=True))
        version = merge.result["version"]
        with meter.step("hot swap in the API"):
            wait_served(vit_b, client, version)

        answers = {}
        for adapter, size in (("live", PORTRAIT), ("base", LANDSCAPE)):
            image = scenes["tall" if size == PORTRAIT else "wide"][0]
            prompts = {"points": {"points": POINTS[size], "labels": [1, 0], "multimask": True},
                       "box": {"box": BOXES[size], "multimask": False}}
            for form, prompt in prompts.items():
                with meter.step(f"segment {adapter} {size[1]}x{size[0]} {form}"):
                    result = client.segment(image, adapter=adapter, return_logits=True,
                                            **prompt)
                expected = f"live:{version}" if adapter == "live" else "base"
                assert result.adapter_version == expected
                answers[adapter, form] = (result, prompt, size, image)

    registry = Registry(connect(vit_b.redis.url), vit_b.store)
    local = registry.fetch_version(version, vit_b.root / "reader")
    adapter_dir = local / registry.get_version(version).adapter_dir
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    blocks = {int(re.search(r"blocks\.(\d+)\.", k).group(1)) for k in weights}
    assert config["r"] == 10 and blocks == {7, 8, 9, 10, 11}
    for key, value in weights.items():
        assert value.shape == ((10, 768) if "lora_A" in key else (2304, 10)), key
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # trained

    figures = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(int(THREADS))
    try:
        sam = build_sam("vit_b", checkpoint)
        assert len(sam.image_encoder.blocks) == 12
        with meter.step("SamPredictor base, set_image 1280x720"):
            predictor = SamPredictor(sam)
            predictor.set_image(answers["base", "box"][3])
        for form in ("points", "box"):
            body, prompt, size, _ = answers["base", form]
            figures[f"base {form}"] = check_parity(body, predictor, size, prompt)
        with meter.step("PEFT merge_and_unload + SamPredictor live, set_image 600x900"):
            merged = PeftModel.from_pretrained(sam, str(adapter_dir)).merge_and_unload()
            predictor = SamPredictor(merged)
            predictor.set_image(answers["live", "box"][3])
        for form in ("points", "box"):
            body, prompt, size, _ = answers["live", form]
            figures[f"live {form}"] = check_parity(body, predictor, size, prompt)
    finally:
        torch.set_num_threads(threads)

    say("parity with SamPredictor: " + json.dumps(figures))
    for name, diff in figures.items():
        assert diff["mask_pixels_differing"] <= 1e-4, (name, diff)
        assert diff["score_diff"] <= 1e-3 and diff["logit_diff"] <= 1e-2, (name, diff)
    say("steps (shared 2-core machine):\n" + meter.table())
    say("worker phases:\n" + "\n".join(
        line.split("] ", 1)[-1] for line in worker.log.read_text().splitlines()
        if (" phase " in line and " took " in line) or " in all," in line))
