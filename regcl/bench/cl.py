"""``regcl bench cl``: the RegCL paper's continual-learning protocol on the synthetic domains.

For each domain order: zero-shot base, the individual adapters (upper bound), sequential
fine-tuning of one adapter, and every merge method folding the per-domain adapters in order.
Each run yields a continual matrix ``M[i][j]`` (IoU on domain j of the model after step i), from
which AA, FM and FT follow. Individual adapters do not depend on the order, and every merge
method is symmetric in its domains, so both are computed once per domain / domain set and reused.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from peft import PeftModel

from regcl.adapters.config import AdapterConfig
from regcl.adapters.lora import adapter_weights, attach_lora, load_weights_into
from regcl.data.domains import PAPER_ORDER, domain_split
from regcl.evaluation.metrics import average_accuracy, forgetting, forward_transfer
from regcl.merging import STREAMING_METHODS, ContinualMergeState, merge_adapters
from regcl.models.build import build_sam
from regcl.training.adapter import (
    TrainConfig,
    encoder_prefix_cache,
    evaluate_prefix,
    gram_stats_from_prefix,
    train_adapter,
)

logger = logging.getLogger(__name__)

MERGE_METHODS_BENCHED = ("regcl", "regcl_product", "mean", "task_arithmetic", "ties", "magmax")
Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BenchConfig:
    domains: tuple[str, ...] = PAPER_ORDER
    orders: int = 3
    train_per_domain: int = 128
    test_per_domain: int = 64
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: tuple[str, ...] = MERGE_METHODS_BENCHED
    eval_seed: int = 0
    checkpoint: str | None = None

    @classmethod
    def quick(cls) -> BenchConfig:
        """A smoke run of about a minute: 3 domains, few images, one epoch."""
        return cls(domains=PAPER_ORDER[:3], train_per_domain=16, test_per_domain=16,
                   train=TrainConfig(epochs=2))


def domain_orders(domains: Sequence[str], count: int) -> list[tuple[str, ...]]:
    """The paper's order first, then its reverse, then seeded shuffles (deterministic)."""
    orders = [tuple(domains)]
    if count > 1 and len(domains) > 1:
        orders.append(tuple(reversed(domains)))
    gen = torch.Generator().manual_seed(1234)
    attempts = 0
    while len(orders) < count and attempts < 1000:
        attempts += 1
        perm = tuple(domains[i] for i in torch.randperm(len(domains), generator=gen).tolist())
        if perm not in orders:
            orders.append(perm)
    return orders


@dataclass
class DomainData:
    train_masks: torch.Tensor
    train_prefix: torch.Tensor
    test_masks: torch.Tensor
    test_prefix: torch.Tensor
    train_images: torch.Tensor


class ContinualBench:
    """Holds one PEFT-wrapped tiny SAM and swaps adapter weights in and out of it."""

    def __init__(self, config: BenchConfig, progress: Callable[[str], None] | None = None):
        self.config = config
        self.say = progress or (lambda msg: logger.info("%s", msg))
        self.model: PeftModel = attach_lora(build_sam("tiny", config.checkpoint), config.adapter)
        self.fresh: Weights = adapter_weights(self.model)
        self.zero: Weights = {k: torch.zeros_like(v) for k, v in self.fresh.items()}
        self.data: dict[str, DomainData] = {}
        self.scores: dict[tuple, dict[str, dict[str, float]]] = {}
        self.adapters: dict[str, Weights] = {}
        self.stats: dict[str, Weights] = {}

    def prepare(self) -> None:
        for name in self.config.domains:
            tr_img, tr_mask = domain_split(name, "train", self.config.train_per_domain)
            te_img, te_mask = domain_split(name, "test", self.config.test_per_domain)
            self.data[name] = DomainData(
                tr_mask, encoder_prefix_cache(self.model, tr_img), te_mask,
                encoder_prefix_cache(self.model, te_img), tr_img)
        self.say(f"prepared {len(self.data)} domains")

    def evaluate(self, key: tuple, weights: Weights) -> dict[str, dict[str, float]]:
        """Scores of ``weights`` on every domain's test split, cached under ``key``."""
        if key not in self.scores:
            load_weights_into(self.model, weights)
            self.scores[key] = {
                name: evaluate_prefix(self.model, d.test_prefix, d.test_masks,
                                      seed=self.config.eval_seed)
                for name, d in self.data.items()
            }
        return self.scores[key]

    def train(self, name: str, start: Weights) -> Weights:
        load_weights_into(self.model, start)
        d = self.data[name]
        t0 = time.monotonic()
        train_adapter(self.model, d.train_images, d.train_masks, self.config.train,
                      prefix=d.train_prefix)
        self.say(f"trained on {name} in {time.monotonic() - t0:.1f}s")
        return adapter_weights(self.model)

    def individual(self, name: str) -> Weights:
        if name not in self.adapters:
            self.adapters[name] = self.train(name, self.fresh)
            self.stats[name] = gram_stats_from_prefix(self.model, self.data[name].train_prefix)
        return self.adapters[name]

    def matrix(self, rows: Sequence[dict[str, dict[str, float]]], order: Sequence[str],
               metric: str = "iou") -> list[list[float]]:
        return [[row[name][metric] for name in order] for row in rows]

    def sequential_rows(self, order: Sequence[str]) -> list[dict]:
        rows, weights = [], self.fresh
        for step, name in enumerate(order):
            weights = self.individual(name) if step == 0 else self.train(name, weights)
            rows.append(self.evaluate(("sequential", tuple(order[: step + 1])), weights))
        return rows

    def merge_rows(self, method: str, order: Sequence[str]) -> list[dict]:
        rows = []
        state = ContinualMergeState(method) if method in STREAMING_METHODS else None
        for step, name in enumerate(order):
            seen = tuple(order[: step + 1])
            key = (method, frozenset(seen))
            if state is not None:
                # The continual path: fold the new domain's adapter and statistics only.
                state.fold(self.individual(name), self.stats[name], domain=name)
                merged = state.merged() if key not in self.scores else None
            else:
                merged = merge_adapters(method, [self.individual(n) for n in seen],
                                        [self.stats[n] for n in seen])
            rows.append(self.evaluate(key, merged))
        return rows


def summarise(matrices: Sequence[list[list[float]]]) -> dict[str, float]:
    """Mean and standard deviation over orders of AA, FM and FT."""
    out: dict[str, float] = {}
    for label, fn in (("AA", average_accuracy), ("FM", forgetting), ("FT", forward_transfer)):
        values = [fn(m) for m in matrices]
        out[label] = statistics.fmean(values)
        out[f"{label}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
    return out


def run_cl_benchmark(config: BenchConfig, progress: Callable[[str], None] | None = None
                     ) -> dict:
    """Run the protocol; returns a JSON-ready dict (config, per-method summary, matrices)."""
    start = time.monotonic()
    bench = ContinualBench(config, progress)
    bench.prepare()
    orders = domain_orders(config.domains, config.orders)
    base = bench.evaluate(("base",), bench.zero)
    base_iou = [base[n]["iou"] for n in config.domains]
    results: dict[str, dict] = {
        "zero-shot base": {"AA": statistics.fmean(base_iou), "FM": 0.0, "FT": None,
                           "per_domain": {n: base[n] for n in config.domains}},
    }
    own = {n: bench.evaluate(("individual", n), bench.individual(n))[n] for n in config.domains}
    results["individual adapters"] = {
        "AA": statistics.fmean(s["iou"] for s in own.values()), "FM": 0.0, "FT": None,
        "per_domain": own}
    runs: dict[str, list] = {"sequential": []}
    runs.update({m: [] for m in config.methods})
    for i, order in enumerate(orders):
        bench.say(f"order {i + 1}/{len(orders)}: {' → '.join(order)}")
        runs["sequential"].append((order, bench.sequential_rows(order)))
        for method in config.methods:
            runs[method].append((order, bench.merge_rows(method, order)))
    for label, per_order in runs.items():
        matrices = [bench.matrix(rows, order) for order, rows in per_order]
        name = "sequential fine-tuning" if label == "sequential" else f"merge: {label}"
        final = [rows[-1] for _, rows in per_order]
        results[name] = {
            **summarise(matrices),
            "final_dice": statistics.fmean(r[n]["dice"] for r in final for n in config.domains),
            "final_mae": statistics.fmean(r[n]["mae"] for r in final for n in config.domains),
            "matrices": [{"order": list(o), "iou": m} for (o, _), m in zip(per_order, matrices)],
        }
    return {
        "config": _config_json(config),
        "orders": [list(o) for o in orders],
        "results": results,
        "elapsed_s": round(time.monotonic() - start, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}, {platform.python_version()}",
    }


def _config_json(config: BenchConfig) -> dict:
    data = asdict(config)
    data["adapter"] = asdict(config.adapter)
    data["train"] = asdict(config.train)
    return data


def markdown_table(report: dict) -> str:
    """The summary table: one row per method, AA/FM/FT (IoU) as mean ± std over orders."""

    def cell(row: dict, key: str) -> str:
        value = row.get(key)
        if value is None:
            return "–"
        std = row.get(f"{key}_std")
        return f"{value:.3f} ± {std:.3f}" if std is not None else f"{value:.3f}"

    lines = ["| method | AA (IoU) ↑ | FM ↓ | FT ↑ | final Dice | final MAE ↓ |",
             "|---|---|---|---|---|---|"]
    for name, row in report["results"].items():
        dice = f"{row['final_dice']:.3f}" if "final_dice" in row else "–"
        mae = f"{row['final_mae']:.3f}" if "final_mae" in row else "–"
        lines.append(f"| {name} | {cell(row, 'AA')} | {cell(row, 'FM')} | {cell(row, 'FT')} "
                     f"| {dice} | {mae} |")
    return "\n".join(lines)


__all__ = ["BenchConfig", "domain_orders", "markdown_table", "run_cl_benchmark"]
