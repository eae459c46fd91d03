"""The over-HTTP sections of ``regcl bench serve``: each load phase runs in the spawned load
process (:mod:`cli.bench_serve.load`) while this process runs the in-process baseline right
before and after it; uploads, activations and the API's metrics go through the library's
client (:class:`regcl.client.Client`)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from cli.bench_serve.auto_rows import auto_benchmark
from cli.bench_serve.config import ServeBenchConfig
from cli.bench_serve.inprocess import BaselineLoop
from cli.bench_serve.load import Phase, bench_image, client_process, summarise
from regcl.client import Client
from regcl.errors import RegclError

logger = logging.getLogger(__name__)

__all__ = ["LoadProcess", "http_benchmark"]


class LoadProcess:
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


def _upload_images(api: Client, size: int, count: int, first: int) -> list[str]:
    return [api.upload_image(bench_image(first + i, size)).image_id for i in range(count)]


def _swap_metrics(api: Client) -> dict[str, float]:
    """The API's swap histograms' ``_sum`` and ``_count`` (Prometheus text at /metrics)."""
    values: dict[str, float] = {}
    with contextlib.suppress(RegclError, ValueError):
        for line in api.metrics().splitlines():
            name, _, value = line.partition(" ")
            if name.startswith("regcl_adapter_swap") and name.endswith(("_sum", "_count")):
                values[name] = float(value)
    return values


def _activate(api: Client, version: int) -> float:
    """Activate ``version``; the wall-clock time the request was sent."""
    at = time.time()
    api.activate(version)
    return at


def http_benchmark(config: ServeBenchConfig, url: str, admin_key: str | None,
                   versions: list[int], size: int, baseline: BaselineLoop,
                   domains: int = 0) -> dict[str, Any]:
    """Every phase over HTTP against the API at ``url`` (hot swap and the HTTP LoRA overhead
    only with ``admin_key`` and two ``versions``; the auto rows only with ``domains``
    registered bench domain adapters, :mod:`cli.bench_serve.auto_rows`)."""
    api = Client(url, admin_key, timeout=300.0)
    client = LoadProcess()
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
        ids = _upload_images(api, size, config.cached_images, 20_000_000)
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
        wanted = tuple(k for k in config.auto_domains if k <= domains)
        if wanted:
            out["auto"] = auto_benchmark(client.run, url, config.concurrency,
                                         config.auto_requests, wanted)
        if admin_key and len(versions) >= 2:
            out["lora_overhead"] = _http_lora_overhead(config, client, phase, index)
            index += 4 * config.overhead_requests
            out["hot_swap"] = _hot_swap(config, client, phase, index, api, versions)
        else:
            out["skipped"] = "hot swap and HTTP LoRA overhead need --admin-key and two " \
                             "versions (--swap-versions)"
    finally:
        client.close()
        api.close()
    return out


def _mean_rate(before: dict[str, Any], after: dict[str, Any]) -> float:
    """The baseline's rate around a service phase: both blocks' requests over both walls."""
    return round((before["requests"] + after["requests"])
                 / (before["wall_s"] + after["wall_s"]), 2)


def _http_lora_overhead(config: ServeBenchConfig, client: LoadProcess, phase, index: int
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


def _hot_swap(config: ServeBenchConfig, client: LoadProcess, phase, index: int, api: Client,
              versions: list[int]) -> dict[str, Any]:
    c = max(config.concurrency)
    order = [versions[(i + 1) % 2] for i in range(config.swaps)]  # v2, v1, v2, ...
    duration = config.swap_interval_s * (config.swaps + 1)

    def activations() -> list[tuple[float, int]]:
        done = []
        time.sleep(config.swap_interval_s)
        for version in order:
            done.append((_activate(api, version), version))
            time.sleep(config.swap_interval_s)
        return done

    before = _swap_metrics(api)
    result = client.run(phase("hot-swap", mode="new", concurrency=c, requests=config.requests,
                              first_index=index, duration_s=duration), during=activations)
    after = _swap_metrics(api)
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
