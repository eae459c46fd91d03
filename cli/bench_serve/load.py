"""The load generator of ``regcl bench serve``: HTTP clients in a process of their own.

:func:`client_process` runs in a separate (spawned) process and serves phases the benchmark
sends it over a pipe: it builds its payloads first (untimed), then runs ``concurrency``
asyncio clients (httpx) until the phase's requests are done or its duration is over, and sends
back one record per request: start and end wall-clock times (``time.time()``, comparable with
the parent's), HTTP status and the adapter version the response names. Nothing here imports
torch, so the client process stays light. This is the one place of the benchmark that does
not use :class:`regcl.client.Client`: it is a load generator (asyncio, one event loop for
every concurrent client, request bodies built before the clock starts, answers parsed but not
decoded), and its figures must stay comparable with the earlier runs'.

Images (:func:`bench_image`) are smooth random RGB images, each made unique by its index (the
service keys embeddings by content hash, so every "new image" request misses the cache); the
in-process baseline uses the very same arrays.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Phase", "bench_image", "client_process", "png_bytes", "summarise"]

VERSION_HEADER = "X-Regcl-Adapter-Version"


def bench_image(index: int, size: int) -> np.ndarray:
    """A smooth size x size x 3 uint8 image, unique per ``index`` (first pixels encode it)."""
    from PIL import Image

    rng = np.random.default_rng(1_000_003 + index % 64)
    low = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    image = np.array(Image.fromarray(low).resize((size, size), Image.BICUBIC))
    image[0, :4] = np.frombuffer(int(index).to_bytes(12, "little"), np.uint8).reshape(4, 3)
    return image


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def bench_point(size: int) -> list[list[float]]:
    """The prompt of every request: one foreground point a little off the centre."""
    return [[size * 0.45, size * 0.55]]


@dataclass(frozen=True)
class Phase:
    """One load phase. mode: ``new`` (each request sends a never-seen image inline + one
    point), ``cached`` (one point on one of ``image_ids``, already encoded) or ``batch``
    (``prompts_per_request`` one-point prompts on one of ``image_ids`` in one request).
    requests: how many (``duration_s`` > 0: keep going until then instead, for the hot-swap
    phase)."""

    name: str
    url: str
    mode: str
    concurrency: int
    requests: int
    image_size: int
    first_index: int = 0
    image_ids: tuple[str, ...] = ()
    adapter: str = "live"
    multimask: bool = False
    duration_s: float = 0.0
    prompts_per_request: int = 1  # mode ``batch``: POST /v1/segment/batch with this many
    headers: tuple[tuple[str, str], ...] = ()
    images_png: tuple[bytes, ...] = ()  # mode ``new``: these images (PNG) instead of bench_image


def _payloads(phase: Phase) -> list[dict[str, Any]]:
    point = bench_point(phase.image_size)
    common = {"points": point, "labels": [1], "multimask": phase.multimask,
              "adapter": phase.adapter}
    if phase.mode == "cached":
        return [{**common, "image_id": image_id} for image_id in phase.image_ids]
    if phase.mode == "batch":  # one point per prompt, on a 4 x 4 grid of the image
        side = phase.image_size / 4
        prompts = [{"points": [[side * (j % 4 + 0.5), side * (j // 4 % 4 + 0.5)]],
                    "labels": [1]} for j in range(phase.prompts_per_request)]
        return [{"image_id": image_id, "prompts": prompts, "multimask": phase.multimask,
                 "adapter": phase.adapter} for image_id in phase.image_ids]
    count = phase.requests if phase.duration_s <= 0 else max(phase.requests, 1)
    if phase.images_png:
        return [{**common, "image_base64": base64.b64encode(png).decode("ascii")}
                for png in phase.images_png]
    return [{**common, "image_base64": base64.b64encode(png_bytes(
        bench_image(phase.first_index + i, phase.image_size))).decode("ascii")}
        for i in range(count)]


async def _run(phase: Phase, payloads: list[dict[str, Any]]) -> list[tuple]:
    import httpx

    records: list[tuple] = []
    issued = 0
    path = "/v1/segment/batch" if phase.mode == "batch" else "/v1/segment"
    deadline = time.time() + phase.duration_s if phase.duration_s > 0 else None
    limits = httpx.Limits(max_connections=phase.concurrency,
                          max_keepalive_connections=phase.concurrency)
    async with httpx.AsyncClient(base_url=phase.url, limits=limits, timeout=300.0,
                                 headers=dict(phase.headers)) as client:
        async def one_client() -> None:
            nonlocal issued
            while True:
                if deadline is None and issued >= phase.requests:
                    return
                if deadline is not None and time.time() >= deadline:
                    return
                body = payloads[issued % len(payloads)]
                issued += 1
                start = time.time()
                try:
                    response = await client.post(path, json=body)
                    status = response.status_code
                    version = response.headers.get(VERSION_HEADER, "")
                    if status == 200:
                        response.json()  # parse like a real client
                except httpx.HTTPError as exc:
                    status, version = -1, type(exc).__name__
                records.append((start, time.time(), status, version))

        await asyncio.gather(*(one_client() for _ in range(phase.concurrency)))
    return records


def run_phase(phase: Phase) -> dict[str, Any]:
    """Build the payloads (untimed), run the load; the records and what it took."""
    built = time.time()
    payloads = _payloads(phase)
    records = asyncio.run(_run(phase, payloads))
    return {"name": phase.name, "records": records, "build_s": time.time() - built}


def client_process(conn: Any) -> None:
    """Entry point of the load process: run each :class:`Phase` received on ``conn`` and send
    back its result; ``None`` ends the process."""
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    while True:
        phase = conn.recv()
        if phase is None:
            return
        try:
            conn.send(run_phase(phase))
        except Exception as exc:  # report, keep serving the next phase
            conn.send({"name": phase.name, "error": f"{type(exc).__name__}: {exc}",
                       "records": []})


def summarise(records: list[tuple], *, skip_failed_latency: bool = True) -> dict[str, Any]:
    """Throughput (requests completed / wall time of the phase) and latency percentiles (ms)
    of one phase's records ``(start, end, status, version)``."""
    if not records:
        return {"requests": 0, "ok": 0, "failed": 0}
    starts = np.array([r[0] for r in records])
    ends = np.array([r[1] for r in records])
    ok = np.array([r[2] == 200 for r in records])
    latency = (ends - starts) * 1000
    if skip_failed_latency and ok.any():
        latency = latency[ok]
    wall = float(ends.max() - starts.min())
    p50, p95, p99 = np.percentile(latency, [50, 95, 99])
    return {"requests": len(records), "ok": int(ok.sum()), "failed": int((~ok).sum()),
            "wall_s": round(wall, 3), "throughput": round(float(ok.sum()) / wall, 2),
            "p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2),
            "p99_ms": round(float(p99), 2), "mean_ms": round(float(latency.mean()), 2)}
