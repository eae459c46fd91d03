"""The in-process sections of ``regcl bench serve``: the image encoder per variant and batch,
segment-anything's ``SamPredictor`` loop (the baseline every service figure is compared
with), the encoder's LoRA overhead (folded vs PEFT's unmerged forward), and adapter training
throughput. Everything runs in this process on ``config.device``."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cli.bench_serve.config import ENCODER_VARIANTS, ServeBenchConfig
from cli.bench_serve.load import bench_image, bench_point

logger = logging.getLogger(__name__)

__all__ = ["BaselineLoop", "build_sam", "checkpoint_for", "encoder_benchmark",
           "lora_encoder_overhead", "machine_info", "training_benchmark"]


def machine_info(device: str) -> dict[str, Any]:
    import os

    import peft
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "peft": peft.__version__,
            "device": device, "torch_threads": torch.get_num_threads()}
    try:
        from importlib.metadata import version

        info["segment_anything"] = version("segment_anything")
    except Exception:
        info["segment_anything"] = "unknown"
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: str, seconds: float, min_iters: int = 3
           ) -> float:
    """Mean seconds per call after two warm-up calls, over at least ``seconds``."""
    fn()
    fn()
    _sync(device)
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < seconds:
        fn()
        iters += 1
    _sync(device)
    return (time.perf_counter() - start) / iters


def build_sam(config: ServeBenchConfig, checkpoint: str | None):
    from regcl.models import build_sam

    return build_sam(config.model, checkpoint).to(config.device).eval()


# ----------------------------------------------------------------------------- in-process
def encoder_benchmark(config: ServeBenchConfig, sam) -> list[dict[str, Any]]:
    import torch

    from regcl.models.serving import ServingEncoder

    size = sam.image_encoder.img_size
    rows = []
    for name in config.encoder_variants:
        dtype, sdpa, compile_ = ENCODER_VARIANTS[name]
        encoder = ServingEncoder(sam.image_encoder, device=config.device,
                                 dtype=getattr(torch, dtype), sdpa=sdpa, compile=compile_,
                                 buckets=tuple(sorted(set(config.encoder_batches))))
        for batch in config.encoder_batches:
            pixels = torch.randn(batch, 3, size, size, device=config.device)
            start = time.perf_counter()
            seconds = _timed(lambda e=encoder, p=pixels: e(p), config.device,
                             config.encoder_seconds)
            rows.append({"variant": name, "batch": batch,
                         "img_per_s": round(batch / seconds, 2),
                         "ms_per_batch": round(seconds * 1000, 2),
                         "compiles": encoder.compiles,
                         "wall_s": round(time.perf_counter() - start, 1)})
            logger.info("encoder %s batch %d: %.1f img/s", name, batch, batch / seconds)
        del encoder
    return rows


class BaselineLoop:
    """segment-anything's SamPredictor in a loop (one thread, as a user would write it).

    The benchmark runs a block of it right before each service phase, so the two see the
    same machine load (this matters on a shared machine), and pools the blocks.
    """

    def __init__(self, config: ServeBenchConfig, sam, size: int) -> None:
        from segment_anything import SamPredictor

        self.config, self.sam, self.size = config, sam, size
        self.point, self.label = np.array(bench_point(size)), np.array([1])
        self.predictor = SamPredictor(sam)
        self._next = 10_000_000
        self.cached_sets = []
        for i in range(config.cached_images):
            p = SamPredictor(sam)
            p.set_image(bench_image(9_000_000 + i, size))
            self.cached_sets.append(p)
        self.runs: dict[str, list[dict[str, Any]]] = {"new": [], "cached": []}
        self._latencies: dict[str, list[float]] = {"new": [], "cached": []}
        self._wall = {"new": 0.0, "cached": 0.0}
        self.new(2, record=False)  # warm-up
        self.cached(2, record=False)

    def _predict(self, predictor) -> None:
        predictor.predict(point_coords=self.point, point_labels=self.label,
                          multimask_output=False)

    def new(self, count: int, record: bool = True) -> dict[str, Any]:
        """``set_image`` + ``predict`` on ``count`` never-seen images."""
        images = [bench_image(self._next + i, self.size) for i in range(count)]
        self._next += count
        latencies = []
        start = time.perf_counter()
        for image in images:
            t = time.perf_counter()
            self.predictor.set_image(image)
            self._predict(self.predictor)
            _sync(self.config.device)
            latencies.append(time.perf_counter() - t)
        return self._record("new", latencies, time.perf_counter() - start, record)

    def cached(self, count: int, record: bool = True) -> dict[str, Any]:
        """``predict`` alone, round-robin over images already set."""
        latencies = []
        start = time.perf_counter()
        for i in range(count):
            t = time.perf_counter()
            self._predict(self.cached_sets[i % len(self.cached_sets)])
            _sync(self.config.device)
            latencies.append(time.perf_counter() - t)
        return self._record("cached", latencies, time.perf_counter() - start, record)

    def _record(self, kind: str, latencies: list[float], wall: float, record: bool
                ) -> dict[str, Any]:
        summary = _latency_summary(latencies, wall)
        if record:
            self.runs[kind].append(summary)
            self._latencies[kind] += latencies
            self._wall[kind] += wall
        return summary

    def pooled(self) -> dict[str, Any]:
        return {kind: {**_latency_summary(self._latencies[kind], self._wall[kind]),
                       "blocks": self.runs[kind]}
                for kind in ("new", "cached") if self._latencies[kind]}


def _latency_summary(latencies: list[float], wall: float) -> dict[str, Any]:
    ms = np.array(latencies) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"requests": len(latencies), "wall_s": round(wall, 3),
            "throughput": round(len(latencies) / wall, 2), "p50_ms": round(float(p50), 2),
            "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2)}


def lora_encoder_overhead(config: ServeBenchConfig, sam) -> dict[str, Any]:
    """Per-image encoder time: base; one adapter folded into the weights (what a compiled
    encoder serves); the mixed path with one adapter for every image and with a different
    adapter per image (what an uncompiled encoder serves); PEFT's unmerged LoRA forward."""
    import copy

    import torch

    from regcl.adapters import AdapterConfig, attach_lora
    from regcl.models.lora_bank import lora_factors
    from regcl.models.serving import ServingEncoder

    batch = max(config.encoder_batches)
    size = sam.image_encoder.img_size
    pixels = torch.randn(batch, 3, size, size, device=config.device)
    serving = ServingEncoder(sam.image_encoder, device=config.device)
    peft_model = attach_lora(copy.deepcopy(sam), AdapterConfig())
    peft_encoder = peft_model.base_model.model.image_encoder
    gen = torch.Generator().manual_seed(0)
    keys = [f"a{i}" for i in range(batch)]
    for key in keys:  # one random adapter per image of the batch
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.02)
        serving.add_adapter(key, lora_factors(peft_encoder, "default"))
    deltas = serving.delta_weights(keys[-1])  # PEFT holds the last one

    def peft_forward() -> None:
        with torch.no_grad():
            peft_encoder(pixels)

    variants: dict[str, Callable[[], object]] = {
        "base": lambda: serving(pixels), "folded": lambda: serving(pixels),
        "mixed_one": lambda: serving(pixels, [keys[-1]] * batch),
        "mixed_each": lambda: serving(pixels, keys), "peft_lora": peft_forward}
    runs: dict[str, list[float]] = {label: [] for label in variants}
    rounds = 5
    for _ in range(rounds):  # interleaved, so a busy moment hits every variant alike
        for label, fn in variants.items():
            serving.fold(deltas if label == "folded" else None)
            runs[label].append(_timed(fn, config.device, config.encoder_seconds / rounds,
                                      min_iters=2))
    serving.fold(None)
    times = {label: float(np.median(values)) for label, values in runs.items()}
    return {"batch": batch, "dtype": "float32", "rounds": rounds,
            "ms_per_img": {k: round(v * 1000 / batch, 3) for k, v in times.items()},
            **{f"{k}_vs_base": round(times[k] / times["base"], 4) for k in times if
               k != "base"}}


def training_benchmark(config: ServeBenchConfig, checkpoint: str | None) -> dict[str, Any]:
    import torch

    from regcl.adapters import AdapterConfig, attach_lora
    from regcl.data import synthetic
    from regcl.models import build_sam
    from regcl.training.adapter import TrainConfig, encoder_prefix_cache, train_adapter

    sam = build_sam(config.model, checkpoint).to(config.device)
    size = sam.image_encoder.img_size
    images, masks = synthetic.chunked(synthetic.source_scenes, 7, 0, config.train_images, size)
    model = attach_lora(sam, AdapterConfig())
    start = time.perf_counter()
    prefix = encoder_prefix_cache(model, images.to(config.device), batch_size=8)
    _sync(config.device)
    prefix_s = time.perf_counter() - start
    train = TrainConfig(epochs=config.train_epochs, batch_size=config.train_batch)
    start = time.perf_counter()
    train_adapter(model, images, masks, train, prefix=prefix)
    _sync(config.device)
    train_s = time.perf_counter() - start
    seen = config.train_images * config.train_epochs
    return {"images": config.train_images, "epochs": config.train_epochs,
            "batch_size": config.train_batch,
            "prefix_s": round(prefix_s, 2), "train_s": round(train_s, 2),
            "img_per_s": round(seen / train_s, 2),
            "img_per_s_with_prefix": round(seen / (train_s + prefix_s), 2),
            "torch_threads": torch.get_num_threads()}


def checkpoint_for(config: ServeBenchConfig, work_dir: Path) -> str | None:
    """The weights to serve: the given checkpoint, the shipped tiny weights (None), or for
    ``random_weights`` a seeded random SAM written to ``work_dir``."""
    if not config.random_weights:
        return config.checkpoint
    import torch
    from safetensors.torch import save_file

    from regcl.models.build import SAM_SPECS, build_sam_from_spec

    torch.manual_seed(0)
    sam = build_sam_from_spec(SAM_SPECS[config.model])
    path = work_dir / f"random_{config.model}.safetensors"
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(path))
    return str(path)
