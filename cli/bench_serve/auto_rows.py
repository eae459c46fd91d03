"""The ``auto`` rows of ``regcl bench serve``: ``adapter: "auto"`` over a stream of images from
5 and from 16 interleaved domains, against ``live`` on the same kind of stream, at each
concurrency, in the same run.

The stack registers :data:`BENCH_DOMAINS` domain adapters (:func:`write_domain_adapters`):
seeded random LoRA weights (so each changes the embedding) and real Gram statistics from
``stats_images`` images of one synthetic distribution each: the ten domains of
:data:`~regcl.data.domains.LONG_ORDER`, the source domain, and five more families seen through
another family's imaging shift (:mod:`regcl.data.shifts`). The router therefore holds 16
domains; an auto request routes its image and is encoded with that domain's adapter.

Every request sends a never-seen image (inline PNG; test-split samples, never the statistics'
images), image i from domain ``i mod k``, at the synthetic domains' own 256 px (the API
resizes it to the model's input as it does any image; for vit_* the statistics are taken on
the same images upsampled to the model's size). For each concurrency the rows run as
``live, auto-5, auto-16`` then again in reverse order, and each figure is the mean of its two
runs, so drift in the machine's load hits every row alike; the ratio is to ``live``'s.
Each auto row also says what share of its requests the router sent to a domain adapter (the
rest fell back to live) and how many distinct adapters served it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cli.bench_serve.load import Phase, png_bytes, summarise

logger = logging.getLogger(__name__)

__all__ = ["BENCH_DOMAINS", "auto_benchmark", "domain_images", "write_domain_adapters"]

_CROSS = (("polyp", "thermal"), ("camo", "uv"), ("shadow", "nbi"), ("skin", "night"),
          ("camo_pattern", "aerial"))
BENCH_DOMAINS = 16
IMAGE_SIZE = 256  # the synthetic domains' own size, whatever the model's
_TEST_START = 10_000  # images of the load start here in each domain's test split


def _generators() -> list[tuple[str, Callable]]:
    """The 16 distributions, by adapter name (valid adapter names: lower case, digits, _)."""
    from regcl.data import shifts
    from regcl.data.domains import LONG_ORDER, SOURCE, get_domain

    out = [(name, get_domain(name).generate) for name in LONG_ORDER]
    out.append((SOURCE.name, SOURCE.generate))
    for family, look in _CROSS:
        out.append((f"{family}_{look}", shifts.shifted(get_domain(family).generate,
                                                       getattr(shifts, look))))
    return out


def domain_images(index: int, split: str, start: int, count: int, size: int) -> np.ndarray:
    """Samples ``start..start+count-1`` of bench domain ``index``'s split: count x S x S x 3
    uint8."""
    import zlib

    import torch

    from regcl.data.synthetic import chunked

    name, generate = _generators()[index]
    seed = zlib.crc32(f"regcl-bench/{name}/{split}".encode())
    images = chunked(generate, seed, start, count, size)[0]
    return images.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


def write_domain_adapters(model: str, checkpoint: str | Path | None, directory: Path,
                          count: int = BENCH_DOMAINS, stats_images: int = 24,
                          device: str = "cpu") -> dict[str, Path]:
    """``count`` domain adapters (name -> directory): seeded random LoRA weights on ``model``
    and Gram statistics from ``stats_images`` train-split images of the adapter's domain."""
    import torch

    from regcl.adapters import AdapterConfig, attach_lora, collect_gram_stats, save_adapter
    from regcl.models import build_sam

    torch.manual_seed(0)
    peft_model = attach_lora(build_sam(model, checkpoint).to(device).eval(), AdapterConfig())
    size = peft_model.base_model.model.image_encoder.img_size
    out = {}
    for index, (name, _) in enumerate(_generators()[:count]):
        gen = torch.Generator().manual_seed(100 + index)
        with torch.no_grad():
            for key, p in peft_model.named_parameters():
                if "lora_" in key:
                    p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.device))
        images = torch.from_numpy(domain_images(index, "train", 0, stats_images, IMAGE_SIZE))
        images = images.permute(0, 3, 1, 2).float()
        if size != IMAGE_SIZE:  # as the API's resize would (bilinear here: statistics only)
            images = torch.nn.functional.interpolate(images, size=(size, size),
                                                     mode="bilinear", align_corners=False)
        stats = collect_gram_stats(peft_model, images=images.to(device), batch_size=8)
        out[name] = save_adapter(peft_model, directory / name, stats=stats,
                                 metadata={"domain": name, "bench": "regcl bench serve"})
    return out


class _Streams:
    """Never-seen test images per bench domain, generated a chunk (64) at a time."""

    def __init__(self) -> None:
        from regcl.data.synthetic import CHUNK

        self.size, self.chunk = IMAGE_SIZE, CHUNK
        self._pools: dict[int, list[np.ndarray]] = {}
        self._next: dict[int, int] = {}

    def _take(self, domain: int) -> np.ndarray:
        pool = self._pools.setdefault(domain, [])
        if not pool:
            start = _TEST_START + self._next.get(domain, 0)
            pool.extend(domain_images(domain, "test", start, self.chunk, self.size))
            self._next[domain] = self._next.get(domain, 0) + self.chunk
        return pool.pop(0)

    def pngs(self, domains: int, count: int) -> tuple[bytes, ...]:
        """``count`` inline PNGs, image i from domain ``i mod domains``."""
        return tuple(png_bytes(self._take(i % domains)) for i in range(count))


def auto_benchmark(run_phase: Callable[[Phase], dict[str, Any]], url: str,
                   concurrency: tuple[int, ...], requests: int, domains: tuple[int, ...] = (5, 16)
                   ) -> dict[str, Any]:
    """The auto rows (see the module docstring). ``run_phase`` runs one load phase and
    returns its result (records)."""
    top = max(domains)
    streams = _Streams()

    def phase(name: str, adapter: str, k: int, c: int, count: int) -> Phase:
        return Phase(name=name, url=url, mode="new", concurrency=c, requests=count,
                     image_size=IMAGE_SIZE, adapter=adapter,
                     images_png=streams.pngs(k, count))

    # warm-up: every domain's adapter loaded, every code path run once
    run_phase(phase("auto-warmup", "auto", top, max(concurrency), 2 * top))
    rows = []
    for c in concurrency:
        order = [("live", top), *(("auto", k) for k in domains)]
        runs: dict[str, list[dict[str, Any]]] = {}
        for adapter, k in order + order[::-1]:
            label = "live" if adapter == "live" else f"auto-{k}"
            result = run_phase(phase(f"{label}-c{c}", adapter, k, c, requests))
            records = result["records"]
            summary = summarise(records)
            versions = [r[3] for r in records if r[2] == 200]
            summary["routed"] = round(sum(v.startswith("domain:") for v in versions)
                                      / max(len(versions), 1), 4)
            summary["adapters"] = len({v for v in versions if v.startswith("domain:")})
            runs.setdefault(label, []).append(summary)
        live = float(np.mean([r["throughput"] for r in runs["live"]]))
        for label, blocks in runs.items():
            rate = float(np.mean([r["throughput"] for r in blocks]))
            rows.append({"workload": label, "concurrency": c, "throughput": round(rate, 2),
                         "runs": [r["throughput"] for r in blocks],
                         "p50_ms": round(float(np.mean([r["p50_ms"] for r in blocks])), 1),
                         "p95_ms": round(float(np.mean([r["p95_ms"] for r in blocks])), 1),
                         "failed": sum(r["failed"] for r in blocks),
                         "routed": None if label == "live" else round(float(np.mean(
                             [r["routed"] for r in blocks])), 4),
                         "adapters": max(r["adapters"] for r in blocks),
                         "vs_live": round(rate / live, 3)})
            logger.info("%s, %d clients: %.1f req/s (%.2fx live)", label, c, rate, rate / live)
    return {"domains": list(domains), "registered": top, "requests": requests, "rows": rows}
