"""``regcl bench route``: the served router (:class:`~regcl.routing.compact.CompactRouter`)
against the full Gaussian (:class:`~regcl.routing.DomainRouter`) on the synthetic domains.

What it measures (tiny SAM; the router reads the first adapted block's input, which no adapter
changes, so no adapter is trained: the moments come from the frozen blocks alone):

- **accuracy**: the ten domains of :data:`~regcl.data.domains.LONG_ORDER`, statistics from
  ``train_images`` per domain, every test image routed (best domain), per seed;
- **few images**: the same with statistics from 3, 6, 12, 24, 48 images per domain;
- **unseen images**: a router over the five paper domains; its own domains' test images must
  route (taken at the thresholds, to the right domain), the images of domains it never saw
  must fall back: the five shifted twins (:data:`~regcl.data.domains.SHIFTED_ORDER`), the
  pretraining scenes (``source``, natural-photo-like), uniform colours, uniform noise and
  smooth random images;
- **calibration**: on seeds of their own (``calibration_seeds``), the novelty threshold that
  lets ``target_taken`` of the trained domains' images through, and what it turns away.

Figures are means over the seeds with 95 % t-intervals (:func:`regcl.bench.cl_report.mean_ci`).
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from regcl.bench.cl_report import mean_ci
from regcl.data.domains import LONG_ORDER, PAPER_ORDER, SHIFTED_ORDER, domain_split
from regcl.routing import DEFAULT_MIN_MARGIN, DomainRouter, decide, first_layer_moments
from regcl.routing.compact import CompactRouter, DomainMoments
from regcl.routing.thresholds import DEFAULT_MAX_DIVERGENCE

logger = logging.getLogger(__name__)

__all__ = ["RouteStudyConfig", "route_study_text", "run_route_study"]

ODD = ("uniform", "noise", "smooth")


@dataclass(frozen=True)
class RouteStudyConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    calibration_seeds: tuple[int, ...] = (10, 11, 12)
    domains: tuple[str, ...] = LONG_ORDER
    trained: tuple[str, ...] = PAPER_ORDER
    unseen: tuple[str, ...] = (*SHIFTED_ORDER, "source")
    train_images: int = 48
    test_images: int = 32
    image_counts: tuple[int, ...] = (3, 6, 12, 24, 48)
    rank: int | None = None  # None: the router's default
    prior_images: float | None = None
    volume_weight: float | None = None
    min_margin: float = DEFAULT_MIN_MARGIN
    max_novelty: float = DEFAULT_MAX_DIVERGENCE
    target_taken: float = 0.95
    threads: int = 1
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick(cls) -> RouteStudyConfig:
        return cls(seeds=(0,), calibration_seeds=(10,), domains=LONG_ORDER[:4],
                   trained=PAPER_ORDER[:2], unseen=("polyp_nbi", "source"), train_images=6,
                   test_images=4, image_counts=(3, 6))


class _Moments:
    """Per-image first-layer moments of the tiny SAM (the frozen blocks before the adapter)."""

    def __init__(self) -> None:
        from regcl.adapters.config import default_blocks
        from regcl.models import build_sam

        self.sam = build_sam("tiny").eval()
        encoder = self.sam.image_encoder
        self.block = default_blocks(len(encoder.blocks))[0]

    @torch.no_grad()
    def of(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images N x 3 x S x S in [0, 255] -> (second N x D x D, first N x D, counts N)."""
        from regcl.models import preprocess
        from regcl.models.encoder import encode_prefix

        parts = []
        encoder = self.sam.image_encoder
        for start in range(0, len(images), 16):
            tokens = encode_prefix(encoder, preprocess(self.sam, images[start:start + 16]),
                                   self.block)
            parts.append(first_layer_moments(encoder.blocks[self.block], tokens))
        return tuple(torch.cat(t) for t in zip(*parts))


def _odd_images(kind: str, seed: int, count: int, size: int = 256) -> Tensor:
    gen = torch.Generator().manual_seed(1000 + seed)
    if kind == "uniform":
        return (torch.rand(count, 3, 1, 1, generator=gen) * 255).expand(
            count, 3, size, size).contiguous()
    if kind == "noise":
        return torch.rand(count, 3, size, size, generator=gen) * 255
    low = torch.rand(count, 3, 8, 8, generator=gen) * 255
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic",
                                           align_corners=False).clamp(0, 255).round()


class _Data:
    """Statistics after n images and test moments, per (seed, domain)."""

    def __init__(self, config: RouteStudyConfig) -> None:
        self.config = config
        self.moments = _Moments()
        self.train: dict[tuple[int, str], dict[int, DomainMoments]] = {}
        self.test: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    def stats(self, seed: int, domain: str, n: int) -> DomainMoments:
        key = (seed, domain)
        if key not in self.train:
            most = max((*self.config.image_counts, self.config.train_images))
            images, _ = domain_split(domain, "train", most, start=seed * most)
            second, first, counts = self.moments.of(images)
            weights = counts.double()
            sums = {}
            for k in sorted(set((*self.config.image_counts, self.config.train_images))):
                w = weights[:k] / weights[:k].sum()
                sums[k] = DomainMoments((second[:k] * w[:, None, None]).sum(0),
                                        int(counts[:k].sum()), (first[:k] * w[:, None]).sum(0))
            self.train[key] = sums
        return self.train[key][n]

    def images(self, seed: int, domain: str) -> tuple[Tensor, Tensor]:
        key = (seed, domain)
        if key not in self.test:
            count = self.config.test_images
            if domain in ODD:
                images = _odd_images(domain, seed, count)
            else:
                images, _ = domain_split(domain, "test", count, start=seed * count)
            second, first, _ = self.moments.of(images)
            self.test[key] = (second.float(), first.float())  # half the memory
        return self.test[key]

    @property
    def tokens_per_image(self) -> int:
        return 256  # the tiny SAM's 16 x 16 grid; its block 3 windows need no padding


def _compact(data: _Data, stats: dict[str, DomainMoments]) -> CompactRouter:
    c = data.config
    options = {k: v for k, v in (("rank", c.rank), ("prior_images", c.prior_images),
                                 ("volume_weight", c.volume_weight)) if v is not None}
    return CompactRouter.build(stats, tokens_per_image=data.tokens_per_image, **options)


def _full(stats: dict[str, DomainMoments]) -> DomainRouter:
    router = DomainRouter()
    for name, m in stats.items():
        router.fold_moments(name, m.gram.float(), m.count, m.mean.float())
    return router


def _accuracy(router, data: _Data, seed: int, domains: tuple[str, ...]) -> float:
    names = list(router.domains)
    right = total = 0
    for domain in domains:
        second, first = data.images(seed, domain)
        scores, _ = router.score_moments(second, first)
        right += int((scores.argmax(1) == names.index(domain)).sum())
        total += len(second)
    return right / total


def _unseen(data: _Data, seed: int, n: int) -> dict[str, Any]:
    """A router over the trained domains: its novelty and routes for every image."""
    c = data.config
    router = _compact(data, {d: data.stats(seed, d, n) for d in c.trained})
    names = list(router.domains)
    out: dict[str, Any] = {"trained": [], "unseen": {}}
    for domain in (*c.trained, *c.unseen, *ODD):
        second, first = data.images(seed, domain)
        scores, novelty = router.score_moments(second, first)
        best, margin, best_novelty, _ = decide(scores, novelty, min_margin=0.0,
                                               max_novelty=float("inf"))
        rows = list(zip(best_novelty.tolist(), margin.tolist(),
                        (best == names.index(domain)).tolist() if domain in c.trained
                        else [False] * len(best)))
        if domain in c.trained:
            out["trained"] += rows
        else:
            out["unseen"][domain] = rows
    return out


def _rates(unseen: dict[str, Any], margin: float, novelty: float) -> dict[str, Any]:
    trained = unseen["trained"]
    taken_right = sum(r and m >= margin and v <= novelty for v, m, r in trained) / len(trained)
    per = {k: sum(not (m >= margin and v <= novelty) for v, m, _ in rows) / len(rows)
           for k, rows in unseen["unseen"].items()}
    everything = [x for rows in unseen["unseen"].values() for x in rows]
    back = sum(not (m >= margin and v <= novelty) for v, m, _ in everything) / len(everything)
    return {"trained_taken_right": taken_right, "unseen_fallback": back, "per_kind": per}


def _calibrate(unseen_runs: list[dict[str, Any]], margin: float, target: float) -> float:
    """The largest novelty threshold whose trained taken-and-right share is >= ``target`` on
    every run pooled (the smallest one that reaches it)."""
    trained = [row for run in unseen_runs for row in run["trained"]]
    for threshold in sorted(v for v, _, _ in trained):
        share = sum(r and m >= margin and v <= threshold for v, m, r in trained) / len(trained)
        if share >= target:
            return threshold
    return float("inf")


def run_route_study(config: RouteStudyConfig) -> dict[str, Any]:
    """Every section (see the module docstring); a JSON-ready report."""
    torch.set_num_threads(config.threads)
    start = time.monotonic()
    data = _Data(config)
    report: dict[str, Any] = {"config": asdict(config)}
    accuracy: dict[str, list[float]] = {"full": [], "compact": []}
    for seed in config.seeds:
        stats = {d: data.stats(seed, d, config.train_images) for d in config.domains}
        accuracy["full"].append(_accuracy(_full(stats), data, seed, config.domains))
        router = _compact(data, stats)
        accuracy["compact"].append(_accuracy(router, data, seed, config.domains))
        report["router"] = {"rank": router.rank, "prior_images": router.prior_images,
                            "volume_weight": router.volume_weight, "dim": router.dim,
                            "domain_bytes": router.domain_nbytes(),
                            "shared_bytes": router.shared_nbytes()}
        logger.info("seed %d: accuracy full %.4f, compact %.4f", seed, accuracy["full"][-1],
                    accuracy["compact"][-1])
    report["accuracy"] = {k: {"per_seed": v, **mean_ci(v)} for k, v in accuracy.items()}
    few: dict[str, dict[int, Any]] = {"full": {}, "compact": {}}
    for n in config.image_counts:
        runs: dict[str, list[float]] = {"full": [], "compact": []}
        for seed in config.seeds:
            stats = {d: data.stats(seed, d, n) for d in config.domains}
            runs["full"].append(_accuracy(_full(stats), data, seed, config.domains))
            runs["compact"].append(_accuracy(_compact(data, stats), data, seed,
                                             config.domains))
        for kind, values in runs.items():
            few[kind][n] = {"per_seed": values, **mean_ci(values)}
        logger.info("%d images: full %.4f, compact %.4f", n, few["full"][n]["mean"],
                    few["compact"][n]["mean"])
    report["few_images"] = few
    calibration = [_unseen(data, seed, config.train_images) for seed in config.calibration_seeds]
    chosen = _calibrate(calibration, config.min_margin, config.target_taken)
    report["calibration"] = {"seeds": list(config.calibration_seeds),
                             "target_taken": config.target_taken, "threshold": chosen,
                             "at_threshold": _rates({"trained": [r for c in calibration
                                                                 for r in c["trained"]],
                                                     "unseen": _pool(calibration)},
                                                    config.min_margin, chosen)}
    unseen: dict[int, dict[str, Any]] = {}
    for n in sorted({config.train_images, *config.image_counts}):
        per_seed = [_rates(_unseen(data, seed, n), config.min_margin, config.max_novelty)
                    for seed in config.seeds]
        unseen[n] = {
            "trained_taken_right": mean_ci([r["trained_taken_right"] for r in per_seed]),
            "unseen_fallback": mean_ci([r["unseen_fallback"] for r in per_seed]),
            "per_kind": {k: mean_ci([r["per_kind"][k] for r in per_seed])
                         for k in per_seed[0]["per_kind"]}}
    report["unseen"] = unseen
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    report["machine"] = (f"{platform.machine()}, {config.threads} torch thread(s), "
                         f"torch {torch.__version__}")
    return report


def _pool(runs: list[dict[str, Any]]) -> dict[str, list]:
    pooled: dict[str, list] = {}
    for run in runs:
        for kind, rows in run["unseen"].items():
            pooled.setdefault(kind, []).extend(rows)
    return pooled


def _ci(entry: dict[str, Any]) -> str:
    half = entry.get("ci95")
    return f"{entry['mean']:.4f}" + ("" if half is None else f" ± {half:.4f}")


def route_study_text(report: dict[str, Any]) -> str:
    """The report as markdown."""
    c = report["config"]
    r = report["router"]
    lines = [f"compact router: rank {r['rank']}, prior {r['prior_images']} images, volume "
             f"weight {r['volume_weight']}, D {r['dim']}: {r['domain_bytes']:,} B per domain "
             f"+ {r['shared_bytes']:,} B shared; thresholds margin {c['min_margin']}, "
             f"novelty {c['max_novelty']}; seeds {c['seeds']}",
             "", f"| router | accuracy, {len(c['domains'])} domains, {c['train_images']} "
                 "images per domain |", "|---|---|"]
    for kind in ("full", "compact"):
        lines.append(f"| {kind} | {_ci(report['accuracy'][kind])} |")
    lines += ["", "| images per domain | full | compact |", "|---|---|---|"]
    for n in c["image_counts"]:
        few = report["few_images"]
        lines.append(f"| {n} | {_ci(few['full'][n])} | {_ci(few['compact'][n])} |")
    cal = report["calibration"]
    at = cal["at_threshold"]
    lines += ["", f"calibration (seeds {cal['seeds']}): novelty threshold {cal['threshold']:.3f}"
                  f" lets {at['trained_taken_right']:.4f} of the trained domains' images "
                  f"through (target {cal['target_taken']}) and turns away "
                  f"{at['unseen_fallback']:.4f} of the unseen ones"]
    kinds = list(next(iter(report["unseen"].values()))["per_kind"])
    lines += ["", "| images per domain | trained: routed right | unseen: fall back | "
              + " | ".join(kinds) + " |", "|---" * (3 + len(kinds)) + "|"]
    for n, row in report["unseen"].items():
        lines.append(f"| {n} | {_ci(row['trained_taken_right'])} | "
                     f"{_ci(row['unseen_fallback'])} | "
                     + " | ".join(f"{row['per_kind'][k]['mean']:.2f}" for k in kinds) + " |")
    return "\n".join(lines)
