"""``regcl bench serve``: the serving path against plain segment-anything, in one run.

Sections (each figure is measured in this run, on this machine):

- **encoder**: image-encoder throughput in this process per variant (fp32 / bf16, original
  attention / SDPA, eager / compiled) and batch size.
- **baseline**: segment-anything's own ``SamPredictor`` in a plain loop on the same model and
  device: ``set_image`` + ``predict`` per new image, and ``predict`` alone on images already
  set (the cached-embedding case). The arrays are the ones the clients send (no PNG decode).
  A block runs right before and right after each service phase (same machine conditions);
  each service figure's ratio is to those two blocks.
- **service**: the running API over HTTP, loaded by :mod:`cli.bench_serve.load` from a
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

The service is the real stack (:mod:`cli.bench_serve.stack`) unless ``--url`` names a
running one (then the hot swap and the HTTP LoRA comparison need ``--admin-key`` and two
versions, ``--swap-versions``).

Files: :mod:`~cli.bench_serve.config` (the settings), :mod:`~cli.bench_serve.inprocess` (the
encoder, baseline, LoRA and training sections), :mod:`~cli.bench_serve.phases` (the phases
over HTTP), :mod:`~cli.bench_serve.load` (the load process), :mod:`~cli.bench_serve.stack`
(the stack it starts), and this driver with the markdown report.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cli.bench_serve.config import ServeBenchConfig
from cli.bench_serve.inprocess import (
    BaselineLoop,
    build_sam,
    checkpoint_for,
    encoder_benchmark,
    lora_encoder_overhead,
    machine_info,
    training_benchmark,
)
from cli.bench_serve.phases import http_benchmark

logger = logging.getLogger(__name__)

__all__ = ["run_serve_benchmark", "serve_markdown"]


def run_serve_benchmark(config: ServeBenchConfig) -> dict[str, Any]:
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.time()
    report: dict[str, Any] = {"command": " ".join(["regcl", *sys.argv[1:]]),
                              "machine": machine_info(config.device), "config": asdict(config)}
    with tempfile.TemporaryDirectory(prefix="regcl-bench-serve-") as tmp:
        work = Path(tmp)
        checkpoint = checkpoint_for(config, work)
        sam = build_sam(config, checkpoint)
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
            from cli.bench_serve.stack import running_stack

            env = {"REGCL_DEVICE": config.device, **config.server_env}
            domains = max(config.auto_domains, default=0)
            with running_stack(work, model=config.model, checkpoint=checkpoint,
                               env=env, domains=domains, device=config.device,
                               stats_images=config.auto_stats_images) as stack:
                report["server_env"] = env
                report["service"] = http_benchmark(config, stack.url, stack.admin_key,
                                                   stack.versions, size, baseline,
                                                   len(stack.domains))
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
    auto = service.get("auto")
    if auto:
        lines += ["", f"adapter auto over k interleaved domains ({auto['registered']} domain "
                      f"adapters registered; {auto['requests']} new images per row and run, "
                      "rows run live, auto..., then reversed; req/s the mean of both runs)",
                  "", "| workload | clients | req/s (runs) | p50 ms | p95 ms | failed | "
                      "routed to a domain | adapters used | vs live |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in auto["rows"]:
            routed = "" if row["routed"] is None else f"{row['routed']:.2f}"
            runs = ", ".join(str(r) for r in row["runs"])
            lines.append(f"| {row['workload']} | {row['concurrency']} | {row['throughput']} "
                         f"({runs}) | {row['p50_ms']} | {row['p95_ms']} | {row['failed']} | "
                         f"{routed} | {row['adapters']} | {row['vs_live']:.2f} |")
    lora = report.get("lora_encoder")
    if lora:
        ms = lora["ms_per_img"]
        lines += ["", f"LoRA in the encoder (batch {lora['batch']}, ms/img): base "
                      f"{ms['base']}, one adapter folded (compiled encoders) {ms['folded']} "
                      f"({lora['folded_vs_base']:.3f}x base), mixed path with one adapter "
                      f"{ms['mixed_one']} ({lora['mixed_one_vs_base']:.3f}x), mixed path "
                      f"with a different adapter per image {ms['mixed_each']} "
                      f"({lora['mixed_each_vs_base']:.3f}x), PEFT unmerged "
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
