"""``regcl bench serve``: the serving path against plain segment-anything, in one run.

Sections (each figure is measured in this run, on this machine):

- **encoder**: image-encoder throughput in this process per variant (fp32 / bf16, original
  attention / SDPA, eager / compiled) and batch size.
- **baseline**: segment-anything's own ``SamPredictor`` in a plain loop on the same model and
  device: ``set_image`` + ``predict`` per new image, and ``predict`` alone on images already
  set (the cached-embedding case). The arrays are the ones the clients send (no PNG decode).
  A block runs right before and right after each service phase (same machine conditions);
  each service figure's ratio is to those two blocks.
- **service**: the running API over HTTP, loaded by :mod:`regcl.bench.serve_load` from a
  separate process at each concurrency: new images (image inline + one point; every request
  misses the cache) and one point on an already-encoded image. Throughput (completed requests
  per second of wall time), p50/p95/p99 latency, and the ratio to the baseline.
- **lora_overhead**: new-image throughput with ``adapter=base`` against ``adapter=live`` over
  HTTP (interleaved, twice each), and in-process the encoder with the adapter folded into the
  weights (what the service runs) against PEFT's unmerged LoRA forward and the base.
- **hot_swap**: under image load (inline images, a pool of ``requests`` distinct ones
  cycled, so the same version hits the cache on a repeat but a new version never does), the
  time from an activation (``POST /v1/versions/{n}/activate``) to the first response naming
  the new version, and how many requests failed meanwhile.
- **training**: domain-adapter training throughput (images/s) with regcl's recipe.

The service is the real stack (:mod:`regcl.bench.serve_stack`) unless ``--url`` names a
running one (then the hot swap and the HTTP LoRA comparison need ``--admin-key`` and two
versions, ``--swap-versions``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from regcl.bench.serve_load import Phase, bench_image, bench_point, client_process, summarise

logger = logging.getLogger(__name__)

__all__ = ["ServeBenchConfig", "run_serve_benchmark", "serve_markdown"]


@dataclass(frozen=True)
class ServeBenchConfig:
    model: str = "tiny"
    checkpoint: str | None = None
    random_weights: bool = False  # vit_*: random weights instead of a checkpoint
    device: str = "cpu"
    url: str | None = None
    admin_key: str | None = None
    swap_versions: tuple[int, ...] = ()
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 128  # new-image requests per concurrency level
    cached_requests: int = 256
    cached_images: int = 8
    batch_prompts: int = 16  # prompts per request of the batch phase (POST /v1/segment/batch)
    warmup: int = 32
    baseline_requests: int = 64
    overhead_requests: int = 96
    swaps: int = 3
    swap_interval_s: float = 3.0
    train_images: int = 32
    train_epochs: int = 2
    train_batch: int = 8
    encoder_variants: tuple[str, ...] = ("fp32", "fp32-sdpa")
    encoder_batches: tuple[int, ...] = (1, 8)
    encoder_seconds: float = 3.0
    server_env: dict[str, str] = field(default_factory=dict)
    threads: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> ServeBenchConfig:
        """A smoke run (about a minute on 2 CPU cores, tiny model)."""
        base = cls(concurrency=(1, 4), requests=12, cached_requests=24, cached_images=4,
                   warmup=4, baseline_requests=8, overhead_requests=8, swaps=1,
                   swap_interval_s=2.0, train_images=8, train_epochs=1,
                   encoder_variants=("fp32", "fp32-sdpa"), encoder_batches=(1, 2),
                   encoder_seconds=0.3)
        return replace(base, **overrides)


ENCODER_VARIANTS = {  # name: (dtype, sdpa, compile)
    "fp32": ("float32", False, False),
    "fp32-sdpa": ("float32", True, False),
    "bf16": ("bfloat16", False, False),
    "bf16-sdpa": ("bfloat16", True, False),
    "bf16-sdpa-compile": ("bfloat16", True, True),
    "fp32-compile": ("float32", False, True),
}


def _machine(device: str) -> dict[str, Any]:
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


def _build_sam(config: ServeBenchConfig, checkpoint: str | None):
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
    """Per-image encoder time: base, adapter folded (served), PEFT LoRA unmerged."""
    import copy

    import torch

    from regcl.adapters import AdapterConfig, attach_lora
    from regcl.models.serving import ServingEncoder, lora_deltas

    batch = max(config.encoder_batches)
    size = sam.image_encoder.img_size
    pixels = torch.randn(batch, 3, size, size, device=config.device)
    serving = ServingEncoder(sam.image_encoder, device=config.device)
    peft_model = attach_lora(copy.deepcopy(sam), AdapterConfig())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.02)
    peft_encoder = peft_model.base_model.model.image_encoder
    deltas = lora_deltas(peft_encoder, "default")

    def peft_forward() -> None:
        with torch.no_grad():
            peft_encoder(pixels)

    runs: dict[str, list[float]] = {"base": [], "folded": [], "peft_lora": []}
    rounds = 5
    for _ in range(rounds):  # interleaved, so a busy moment hits every variant alike
        for label in runs:
            serving.fold(deltas if label == "folded" else None)
            fn = peft_forward if label == "peft_lora" else (lambda: serving(pixels))
            runs[label].append(_timed(fn, config.device, config.encoder_seconds / rounds,
                                      min_iters=2))
    times = {label: float(np.median(values)) for label, values in runs.items()}
    return {"batch": batch, "dtype": "float32", "rounds": rounds,
            "ms_per_img": {k: round(v * 1000 / batch, 3) for k, v in times.items()},
            "folded_vs_base": round(times["folded"] / times["base"], 4),
            "peft_lora_vs_base": round(times["peft_lora"] / times["base"], 4)}


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


# ----------------------------------------------------------------------------- over HTTP
class _Client:
    """The load process (spawned) and the pipe to it."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=client_process, args=(child,), daemon=True,
                                    name="regcl-bench-load")
        self._process.start()

    def run(self, phase: Phase, during: Callable[[], Any] | None = None) -> dict[str, Any]:
        self._conn.send(phase)
        extra = during() if during is not None else None
        result = self._conn.recv()
        if result.get("error"):
            raise RuntimeError(f"load phase {phase.name} failed: {result['error']}")
        result["during"] = extra
        return result

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.send(None)
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()


def _upload_images(url: str, size: int, count: int, first: int) -> list[str]:
    import httpx

    from regcl.bench.serve_load import png_bytes

    ids = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for i in range(count):
            data = png_bytes(bench_image(first + i, size))
            response = client.post("/v1/images", files={"file": ("b.png", data, "image/png")})
            response.raise_for_status()
            ids.append(response.json()["image_id"])
    return ids


def _swap_metrics(url: str) -> dict[str, float]:
    """The API's swap histograms' ``_sum`` and ``_count`` (Prometheus text at /metrics)."""
    import httpx

    values: dict[str, float] = {}
    with contextlib.suppress(httpx.HTTPError, ValueError):
        for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
            name, _, value = line.partition(" ")
            if name.startswith("regcl_adapter_swap") and name.endswith(("_sum", "_count")):
                values[name] = float(value)
    return values


def _activate(url: str, key: str, version: int) -> float:
    import httpx

    at = time.time()
    response = httpx.post(f"{url}/v1/versions/{version}/activate",
                          headers={"Authorization": f"Bearer {key}"}, timeout=60)
    response.raise_for_status()
    return at


def http_benchmark(config: ServeBenchConfig, url: str, admin_key: str | None,
                   versions: list[int], size: int, baseline: BaselineLoop
                   ) -> dict[str, Any]:
    client = _Client()
    out: dict[str, Any] = {"new": [], "cached": []}
    index = 0

    def phase(name: str, **kw: Any) -> Phase:
        return Phase(name=name, url=url, image_size=size, **kw)

    try:
        top = max(config.concurrency)
        client.run(phase("warmup", mode="new", concurrency=top, requests=config.warmup,
                         first_index=index))
        index += config.warmup
        for c in config.concurrency:
            row = _with_baseline(client, phase(f"new-c{c}", mode="new", concurrency=c,
                                               requests=config.requests, first_index=index),
                                 lambda: baseline.new(config.baseline_requests))
            index += config.requests
            out["new"].append(row)
            logger.info("new images, %d clients: %.1f req/s (%.2fx baseline)", c,
                        row["throughput"], row["vs_baseline"])
        ids = _upload_images(url, size, config.cached_images, 20_000_000)
        client.run(phase("cached-warm", mode="cached", concurrency=1, requests=len(ids),
                         image_ids=tuple(ids)))
        for c in config.concurrency:
            row = _with_baseline(client, phase(f"cached-c{c}", mode="cached", concurrency=c,
                                               requests=config.cached_requests,
                                               image_ids=tuple(ids)),
                                 lambda: baseline.cached(config.cached_requests))
            out["cached"].append(row)
            logger.info("cached prompts, %d clients: %.1f req/s, p50 %.1f ms", c,
                        row["throughput"], row["p50_ms"])
        out["batch"] = _batch_phase(config, client, phase, baseline, tuple(ids), top)
        if admin_key and len(versions) >= 2:
            out["lora_overhead"] = _http_lora_overhead(config, client, phase, index)
            index += 4 * config.overhead_requests
            out["hot_swap"] = _hot_swap(config, client, phase, index, url, admin_key,
                                        versions)
        else:
            out["skipped"] = "hot swap and HTTP LoRA overhead need --admin-key and two " \
                             "versions (--swap-versions)"
    finally:
        client.close()
    return out


def _mean_rate(before: dict[str, Any], after: dict[str, Any]) -> float:
    """The baseline's rate around a service phase: both blocks' requests over both walls."""
    return round((before["requests"] + after["requests"])
                 / (before["wall_s"] + after["wall_s"]), 2)


def _http_lora_overhead(config: ServeBenchConfig, client: _Client, phase, index: int
                        ) -> dict[str, Any]:
    c = max(config.concurrency)
    rates: dict[str, list[float]] = {"base": [], "live": []}
    for adapter in ("base", "live", "base", "live"):
        result = client.run(phase(f"overhead-{adapter}", mode="new", concurrency=c,
                                  requests=config.overhead_requests, first_index=index,
                                  adapter=adapter))
        index += config.overhead_requests
        rates[adapter].append(summarise(result["records"])["throughput"])
    base, live = float(np.mean(rates["base"])), float(np.mean(rates["live"]))
    return {"concurrency": c, "base_req_s": round(base, 2), "live_req_s": round(live, 2),
            "runs": rates, "live_vs_base": round(live / base, 4),
            "overhead_pct": round((base / live - 1) * 100, 2)}


def _hot_swap(config: ServeBenchConfig, client: _Client, phase, index: int, url: str,
              key: str, versions: list[int]) -> dict[str, Any]:
    c = max(config.concurrency)
    order = [versions[(i + 1) % 2] for i in range(config.swaps)]  # v2, v1, v2, ...
    duration = config.swap_interval_s * (config.swaps + 1)

    def activations() -> list[tuple[float, int]]:
        done = []
        time.sleep(config.swap_interval_s)
        for version in order:
            done.append((_activate(url, key, version), version))
            time.sleep(config.swap_interval_s)
        return done

    before = _swap_metrics(url)
    result = client.run(phase("hot-swap", mode="new", concurrency=c, requests=config.requests,
                              first_index=index, duration_s=duration), during=activations)
    after = _swap_metrics(url)
    records = result["records"]
    swaps = []
    for at, version in result["during"]:
        label = f"live:{version}"
        seen = [end for _, end, status, v in records if status == 200 and v == label
                and end >= at]
        swaps.append({"version": version,
                      "latency_ms": round((min(seen) - at) * 1000, 1) if seen else None})
    latencies = [s["latency_ms"] for s in swaps if s["latency_ms"] is not None]
    summary = summarise(records)
    server = {}
    for name in ("regcl_adapter_swap_seconds", "regcl_adapter_swap_paused_seconds"):
        count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
        total = after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)
        server[name.removeprefix("regcl_adapter_") + "_mean_ms"] = \
            round(total / count * 1000, 1) if count else None
    return {"concurrency": c, "swaps": swaps, "server": server,
            "requests": summary["requests"],
            "failed": summary["failed"], "throughput": summary.get("throughput"),
            "max_latency_ms": max(latencies) if latencies else None,
            "median_latency_ms": float(np.median(latencies)) if latencies else None}


# ----------------------------------------------------------------------------- driver
def _checkpoint(config: ServeBenchConfig, work_dir: Path) -> str | None:
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


def _with_baseline(client: Any, load: Phase, baseline_block: Callable[[], dict[str, Any]],
                   per_request: int = 1) -> dict[str, Any]:
    """Run ``load`` between two baseline blocks; its summary, with the baseline's mean rate
    and the ratio (service units per second: requests x ``per_request`` prompts)."""
    before = baseline_block()
    result = client.run(load)
    after = baseline_block()
    row = {"concurrency": load.concurrency, **summarise(result["records"]),
           "baseline_throughput": _mean_rate(before, after)}
    if per_request != 1:
        row["prompts_per_request"] = per_request
        row["prompts_per_s"] = round(row["throughput"] * per_request, 2)
    row["vs_baseline"] = round(row["throughput"] * per_request / row["baseline_throughput"], 3)
    return row


def _batch_phase(config: ServeBenchConfig, client: Any, phase: Callable[..., Phase],
                 baseline: Any, ids: tuple[str, ...], concurrency: int) -> dict[str, Any]:
    """Cached images, ``batch_prompts`` prompts per request (``POST /v1/segment/batch``):
    prompts per second against the baseline's ``predict`` loop around it."""
    k = config.batch_prompts
    row = _with_baseline(client, phase(f"batch-c{concurrency}", mode="batch",
                                       concurrency=concurrency,
                                       requests=max(4 * concurrency, config.cached_requests // k),
                                       image_ids=ids, prompts_per_request=k),
                         lambda: baseline.cached(config.cached_requests), per_request=k)
    logger.info("batches of %d prompts, %d clients: %.1f prompts/s (%.2fx baseline)", k,
                concurrency, row["prompts_per_s"], row["vs_baseline"])
    return row


def run_serve_benchmark(config: ServeBenchConfig) -> dict[str, Any]:
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.time()
    report: dict[str, Any] = {"command": " ".join(["regcl", *sys.argv[1:]]),
                              "machine": _machine(config.device), "config": asdict(config)}
    with tempfile.TemporaryDirectory(prefix="regcl-bench-serve-") as tmp:
        work = Path(tmp)
        checkpoint = _checkpoint(config, work)
        sam = _build_sam(config, checkpoint)
        size = sam.image_encoder.img_size
        report["image_size"] = size
        if config.encoder_variants:
            report["encoder"] = encoder_benchmark(config, sam)
        report["lora_encoder"] = lora_encoder_overhead(config, sam)
        report["training"] = training_benchmark(config, checkpoint)
        baseline = BaselineLoop(config, sam, size)
        if config.url:
            report["service"] = http_benchmark(config, config.url, config.admin_key,
                                               list(config.swap_versions), size, baseline)
        else:
            from regcl.bench.serve_stack import running_stack

            env = {"REGCL_DEVICE": config.device, **config.server_env}
            with running_stack(work, model=config.model, checkpoint=checkpoint,
                               env=env) as stack:
                report["server_env"] = env
                report["service"] = http_benchmark(config, stack.url, stack.admin_key,
                                                   stack.versions, size, baseline)
        report["baseline"] = baseline.pooled()
    report["elapsed_s"] = round(time.time() - started, 1)
    return report


def serve_markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    lines = []
    machine = report["machine"]
    lines.append(f"device {machine['device']} {machine.get('gpu', '')}; torch "
                 f"{machine['torch']}, peft {machine['peft']}, segment_anything "
                 f"{machine['segment_anything']}; {machine['cpu_count']} CPUs; image "
                 f"{report['image_size']} px")
    if report.get("encoder"):
        lines += ["", "| encoder variant | batch | img/s | ms/batch |", "|---|---|---|---|"]
        for row in report["encoder"]:
            lines.append(f"| {row['variant']} | {row['batch']} | {row['img_per_s']} | "
                         f"{row['ms_per_batch']} |")
    base = report["baseline"]
    service = report.get("service", {})
    lines += ["", "| workload | clients | req/s | p50 ms | p95 ms | p99 ms | failed | "
                  "SamPredictor req/s (blocks before + after) | ratio |",
              "|---|---|---|---|---|---|---|---|---|"]
    for kind, title in (("new", "new image + 1 point"), ("cached", "1 point, cached")):
        b = base.get(kind)
        if b:
            lines.append(f"| {title}: SamPredictor loop, in-process (all blocks) | 1 | "
                         f"{b['throughput']} | {b['p50_ms']} | {b['p95_ms']} | {b['p99_ms']} "
                         f"| 0 | | |")
        for row in service.get(kind, []):
            lines.append(f"| {title}: service over HTTP | {row['concurrency']} | "
                         f"{row['throughput']} | {row['p50_ms']} | {row['p95_ms']} | "
                         f"{row['p99_ms']} | {row['failed']} | {row['baseline_throughput']} | "
                         f"{row['vs_baseline']:.2f} |")
    batch = service.get("batch")
    if batch:
        lines.append(f"| {batch['prompts_per_request']} points per request "
                     f"(POST /v1/segment/batch), cached: service over HTTP, prompts/s | "
                     f"{batch['concurrency']} | {batch['prompts_per_s']} | {batch['p50_ms']} | "
                     f"{batch['p95_ms']} | {batch['p99_ms']} | {batch['failed']} | "
                     f"{batch['baseline_throughput']} | {batch['vs_baseline']:.2f} |")
    lora = report.get("lora_encoder")
    if lora:
        ms = lora["ms_per_img"]
        lines += ["", f"LoRA in the encoder (batch {lora['batch']}, ms/img): base "
                      f"{ms['base']}, folded (served) {ms['folded']} "
                      f"({lora['folded_vs_base']:.3f}x base), PEFT unmerged "
                      f"{ms['peft_lora']} ({lora['peft_lora_vs_base']:.3f}x base)"]
    http = service.get("lora_overhead")
    if http:
        lines.append(f"LoRA over HTTP ({http['concurrency']} clients, new images): base "
                     f"{http['base_req_s']} req/s, live {http['live_req_s']} req/s, "
                     f"overhead {http['overhead_pct']} %")
    swap = service.get("hot_swap")
    if swap:
        lat = ", ".join(f"{s['latency_ms']}" for s in swap["swaps"])
        server = swap.get("server", {})
        lines.append(f"Hot swap under load ({swap['concurrency']} clients, inline images): "
                     f"activation → first response on the new version {lat} ms; "
                     f"{swap['failed']} failed of {swap['requests']} requests; in the API "
                     f"a swap took {server.get('swap_seconds_mean_ms')} ms (fetch, checks, "
                     f"load), encoding paused {server.get('swap_paused_seconds_mean_ms')} ms")
    train = report.get("training")
    if train:
        lines.append(f"Adapter training: {train['img_per_s']} img/s ({train['images']} "
                     f"images x {train['epochs']} epochs, batch {train['batch_size']}; "
                     f"encoder prefix {train['prefix_s']} s once)")
    return "\n".join(lines)
