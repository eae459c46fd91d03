"""``regcl bench cl --route-only``: the router alone, without training anything.

The router reads the Gram (and mean) of the first adapted linear's input. That input comes
from the frozen blocks before any LoRA, so it does not depend on the adapters: it can be
measured on the training data of each domain without training one. This gives routing
accuracy, the margins between the best and the runner-up domain and the novelty of in-domain
and out-of-domain (probe) images, cheaply, on seeds of their own; the router's default
thresholds (:data:`~regcl.routing.DEFAULT_MIN_MARGIN`, :data:`~regcl.routing.DEFAULT_MAX_NOVELTY`)
were chosen from such a run on seeds the benchmark's tables do not use.
"""

from __future__ import annotations

import logging
import platform
import time
from typing import TYPE_CHECKING, Any

import torch

from regcl.bench.cl_worker import BenchWorker
from regcl.routing import DomainRouter, decide, first_layer_moments
from regcl.training.adapter import first_adapted_block

if TYPE_CHECKING:
    from regcl.bench.cl_config import BenchConfig

logger = logging.getLogger(__name__)

MARGINS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
NOVELTIES = (2.0, 3.0, 4.0, 6.0, 10.0, 20.0)


def run_route_calibration(config: BenchConfig) -> dict[str, Any]:
    """Per seed: a router from each domain's training images, every test image (and every
    probe's) routed; returns margins, novelty and accuracy / taken rates on threshold grids."""
    start = time.monotonic()
    worker = BenchWorker(config)
    block = worker.model.base_model.model.image_encoder.blocks[first_adapted_block(worker.model)]
    images: list[tuple[float, float, bool]] = []  # in-domain: (margin, novelty, right)
    probes: dict[str, list[float]] = {}
    rows = []
    for seed in config.seeds:
        router = DomainRouter(config.route_ridge)
        for domain in config.domains:
            second, first, counts = first_layer_moments(
                block, worker.data(seed, domain, "train").prefix)
            router.fold_moments(domain, second.mean(0), int(counts.sum()), first.mean(0))
        for domain in dict.fromkeys((*config.domains, *config.route_probes)):
            second, first, _ = first_layer_moments(block, worker.data(seed, domain, "test").prefix)
            best, margin, novelty, _ = decide(*router.score_moments(second, first),
                                              min_margin=0.0, max_novelty=float("inf"))
            if domain in config.domains:
                right = best == list(router.domains).index(domain)
                images += zip(margin.tolist(), novelty.tolist(), right.tolist())
                rows.append({"seed": seed, "domain": domain,
                             "accuracy": float(right.double().mean())})
            else:
                probes.setdefault(domain, []).extend(novelty.tolist())
        logger.info("seed %d routed", seed)
    total = len(images)
    grid = [{"min_margin": m, "max_novelty": n,
             "right_and_taken": sum(r and g >= m and v <= n for g, v, r in images) / total,
             "wrong_and_taken": sum(not r and g >= m and v <= n for g, v, r in images) / total}
            for m in MARGINS for n in NOVELTIES]
    novelty = {"in-domain": [v for _, v, _ in images], **probes}
    return {
        "seeds": list(config.seeds), "domains": list(config.domains),
        "probes": list(config.route_probes),
        "accuracy": sum(r for _, _, r in images) / total, "per_domain": rows,
        "margin_quantiles": {"correct": _quantiles([g for g, _, r in images if r]),
                             "wrong": _quantiles([g for g, _, r in images if not r])},
        "wrong_count": sum(not r for _, _, r in images), "count": total,
        "novelty_quantiles": {k: _quantiles(v) for k, v in novelty.items()},
        "novelty_taken": {k: {str(n): sum(x <= n for x in v) / len(v) for n in NOVELTIES}
                          for k, v in novelty.items()},
        "grid": grid,
        "elapsed_s": round(time.monotonic() - start, 1),
        "machine": f"{platform.machine()}, {config.threads} torch thread(s), "
                   f"torch {torch.__version__}",
    }


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = torch.tensor(sorted(values), dtype=torch.float64)
    return {str(q): float(torch.quantile(ordered, q))
            for q in (0.0, 0.001, 0.01, 0.05, 0.5, 0.95, 0.99, 0.999, 1.0)}


def route_text(report: dict[str, Any]) -> str:
    """The calibration as markdown."""
    lines = [f"routing accuracy {report['accuracy']:.4f} ({report['wrong_count']} wrong of "
             f"{report['count']} test images) over seeds {report['seeds']}, "
             f"{len(report['domains'])} domains, probes {report['probes']}"]
    for name, q in report["margin_quantiles"].items():
        if q:
            lines.append(f"margin ({name} routes): " + ", ".join(
                f"q{k}={v:.4f}" for k, v in q.items()))
    for name, q in report["novelty_quantiles"].items():
        lines.append(f"novelty ({name}): " + ", ".join(f"q{k}={v:.3f}" for k, v in q.items()))
    lines += ["", "| min margin | max novelty | right and taken | wrong and taken |",
              "|---|---|---|---|"]
    lines += [f"| {g['min_margin']} | {g['max_novelty']} | {g['right_and_taken']:.4f} "
              f"| {g['wrong_and_taken']:.4f} |" for g in report["grid"]]
    return "\n".join(lines)
