"""From the jobs' per-image scores to the report of ``regcl bench cl``: continual matrices per
(seed, order, method), the ``auto`` rows (router -> individual adapter, else the default merge),
routing accuracy, the merge sweep, and the summaries with intervals (:mod:`regcl.bench.cl_report`).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from regcl.bench.cl_config import BenchConfig, config_json
from regcl.bench.cl_report import paired, summarise_runs
from regcl.evaluation.metrics import average_accuracy, forgetting, forward_transfer
from regcl.routing import decide

PerImage = dict[str, dict[str, torch.Tensor]]
METRICS = ("iou", "dice", "mae")
AUTO = "auto"
MARGIN_GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
NOVELTY_GRID = (1.5, 2.0, 3.0, 4.0, 6.0, 10.0, 1e9)


def domain_means(per_image: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict]:
    """Per domain, the mean of each metric over its test images."""
    return {d: {m: float(v.mean()) for m, v in scores.items()} for d, scores in per_image.items()}


def run_record(seed: int, order: Sequence[str], rows: Sequence[Mapping[str, Mapping]],
               domains: Sequence[str]) -> dict[str, Any]:
    """One continual run: its IoU matrix (rows = steps, columns = ``order``) and metrics."""
    matrix = [[row[d]["iou"] for d in order] for row in rows]
    final = rows[-1]
    record: dict[str, Any] = {
        "seed": seed, "order": list(order), "iou": matrix,
        "AA": statistics.fmean(final[d]["iou"] for d in domains),
        "final_dice": statistics.fmean(final[d]["dice"] for d in domains),
        "final_mae": statistics.fmean(final[d]["mae"] for d in domains),
        "final_per_domain": {d: final[d]["iou"] for d in domains},
    }
    if len(rows) == len(order):
        record.update(AA=average_accuracy(matrix), FM=forgetting(matrix),
                      FT=forward_transfer(matrix))
    return record


def auto_scores(config: BenchConfig, route: Mapping[str, Any], seen: Sequence[str],
                own: Mapping[str, PerImage], fallback: PerImage,
                min_margin: float, max_novelty: float) -> tuple[PerImage, dict[str, float]]:
    """Per-image scores of ``auto`` once ``seen`` domains are known, and its routing figures.

    own: domain -> that domain's individual adapter scored on every domain (per image).
    Every test image (of every domain) is routed among ``seen``: taken routes use that
    domain's individual adapter, the others ``fallback`` (the default merge of ``seen``).
    """
    names = sorted(seen)
    columns = [route["domains"].index(n) for n in names]
    out: PerImage = {}
    correct = taken = total = 0
    for domain in config.domains:
        best, _, _, chosen = decide(route["scores"][domain][:, columns],
                                    route["novelty"][domain][:, columns],
                                    min_margin=min_margin, max_novelty=max_novelty)
        out[domain] = {}
        for metric in METRICS:
            stacked = torch.stack([own[n][domain][metric] for n in names])  # T x N
            routed = stacked.gather(0, best[None, :])[0]
            out[domain][metric] = torch.where(chosen, routed, fallback[domain][metric])
        if domain in seen:
            total += len(best)
            correct += int((best == names.index(domain)).sum())
            taken += int(chosen.sum())
    figures = {"accuracy": correct / total, "taken": taken / total}
    return out, figures


def assemble_report(config: BenchConfig, orders: Sequence[tuple[str, ...]], base: dict,
                    individual_scores: dict, sequential_scores: dict, merge_scores: dict,
                    routing: dict) -> dict[str, Any]:
    """The JSON-ready report (see the module docstring)."""
    domains, seeds = config.domains, config.seeds
    everything = frozenset(domains)
    runs: dict[str, list[dict]] = {"zero-shot base": [], "individual adapters": []}
    for s in seeds:
        runs["zero-shot base"].append(run_record(s, domains, [domain_means(base[s])], domains))
        own = {d: domain_means(individual_scores[s, d])[d] for d in domains}
        runs["individual adapters"].append(run_record(s, domains, [own], domains))
    if orders:
        runs["sequential fine-tuning"] = [
            run_record(s, o, [domain_means(r) for r in sequential_scores[s, o]], domains)
            for s in seeds for o in orders]
    step_sets = ([(o, [o[: t + 1] for t in range(len(o))]) for o in orders] if orders
                 else [(tuple(domains), [tuple(domains)])])
    for spec in config.methods:
        records = []
        for s in seeds:
            for order, prefixes in step_sets:
                keys = [(s, spec, frozenset(p)) for p in prefixes]
                if all(k in merge_scores for k in keys):
                    rows = [domain_means(merge_scores[k]) for k in keys]
                    records.append(run_record(s, order, rows, domains))
        runs[f"merge: {spec}"] = records
    auto, routing_steps = _auto_runs(config, step_sets, individual_scores, merge_scores, routing)
    runs[f"{AUTO} (fallback: {config.default_method})"] = auto
    base_aa = {r["seed"]: r["AA"] for r in runs["zero-shot base"]}
    bound_aa = {r["seed"]: r["AA"] for r in runs["individual adapters"]}
    for records in runs.values():
        add_gain(records, base_aa, bound_aa)
    reference = runs.get("merge: regcl") or []
    results = {name: {**summarise_runs(records), "paired_vs_regcl": paired(records, reference),
                      "runs": records}
               for name, records in runs.items() if records}
    report: dict[str, Any] = {
        "config": config_json(config),
        "orders": [list(o) for o in orders],
        "interval": "95 % Student-t interval of the mean over seeds (each seed's runs, one per "
                    "order, averaged first); paired differences per run, averaged per seed",
        "results": results,
        "routing": _routing_summary(config, individual_scores, merge_scores, routing,
                                    routing_steps),
    }
    if config.sweep:
        report["sweep"] = _sweep(config, merge_scores, everything, base_aa, bound_aa)
    return report


def add_gain(records: Sequence[dict], base_aa: Mapping[int, float],
             bound_aa: Mapping[int, float]) -> None:
    """Sets each run's ``gain_kept``: (AA − base) / (individual − base) of its seed."""
    for r in records:
        gain = bound_aa[r["seed"]] - base_aa[r["seed"]]
        r["gain_kept"] = (r["AA"] - base_aa[r["seed"]]) / gain if gain else None


def _auto_runs(config: BenchConfig, step_sets: Sequence, individual_scores: dict,
               merge_scores: dict, routing: dict) -> tuple[list[dict], list[dict]]:
    records, steps = [], []
    for s in config.seeds:
        own = {d: individual_scores[s, d] for d in config.domains}
        for order, prefixes in step_sets:
            rows = []
            for seen in prefixes:
                fallback = merge_scores[s, config.default_method, frozenset(seen)]
                per_image, figures = auto_scores(config, routing[s], seen, own, fallback,
                                                 config.route_min_margin,
                                                 config.route_max_novelty)
                rows.append(domain_means(per_image))
                steps.append({"seed": s, "order": list(order), "domains": len(seen), **figures})
            records.append(run_record(s, order, rows, config.domains))
    return records, steps


def _routing_summary(config: BenchConfig, individual_scores: dict, merge_scores: dict,
                     routing: dict, steps: list[dict]) -> dict[str, Any]:
    """Routing over all domains (final step): accuracy, margins and novelty, and ``auto``'s
    AA as the thresholds vary (what the defaults are chosen from)."""
    domains = config.domains
    everything = frozenset(domains)
    correct_margins, wrong_margins, novelty_in = [], [], []
    accuracy = []
    for s in config.seeds:
        route = routing[s]
        hits = total = 0
        for d in domains:
            best, margin, novelty, _ = decide(route["scores"][d], route["novelty"][d],
                                              min_margin=0.0, max_novelty=float("inf"))
            right = best == route["domains"].index(d)
            hits, total = hits + int(right.sum()), total + len(best)
            correct_margins += margin[right].tolist()
            wrong_margins += margin[~right].tolist()
            novelty_in += novelty.tolist()
        accuracy.append(hits / total)
    probes = {}
    for probe in config.route_probes:
        values = []
        for s in config.seeds:
            _, _, novelty, _ = decide(routing[s]["scores"][probe], routing[s]["novelty"][probe],
                                      min_margin=0.0, max_novelty=float("inf"))
            values += novelty.tolist()
        probes[probe] = {"novelty_quantiles": _quantiles(values),
                         "taken_by_max_novelty": {str(n): _share(values, n)
                                                  for n in NOVELTY_GRID}}
    grid = []
    for margin in MARGIN_GRID:
        aa, taken = [], []
        for s in config.seeds:
            own = {d: individual_scores[s, d] for d in domains}
            fallback = merge_scores[s, config.default_method, everything]
            per_image, figures = auto_scores(config, routing[s], domains, own, fallback,
                                             margin, config.route_max_novelty)
            aa.append(statistics.fmean(v["iou"] for v in domain_means(per_image).values()))
            taken.append(figures["taken"])
        grid.append({"min_margin": margin, "AA": statistics.fmean(aa),
                     "taken": statistics.fmean(taken)})
    return {
        "min_margin": config.route_min_margin, "max_novelty": config.route_max_novelty,
        "accuracy_all_domains": {"per_seed": accuracy, "mean": statistics.fmean(accuracy)},
        "margin_quantiles": {"correct": _quantiles(correct_margins),
                             "wrong": _quantiles(wrong_margins),
                             "wrong_count": len(wrong_margins),
                             "count": len(correct_margins) + len(wrong_margins)},
        "novelty_quantiles_in_domain": _quantiles(novelty_in),
        "in_domain_taken_by_max_novelty": {str(n): _share(novelty_in, n) for n in NOVELTY_GRID},
        "probes": probes,
        "auto_by_min_margin": grid,
        "steps": steps,
    }


def _sweep(config: BenchConfig, merge_scores: dict, everything: frozenset,
           base_aa: Mapping[int, float], bound_aa: Mapping[int, float]) -> dict[str, Any]:
    """Final-step scores of every swept merge, per seed, with paired differences against the
    default merge (same seed, same adapters)."""
    out: dict[str, Any] = {}
    reference = {s: merge_scores.get((s, config.default_method, everything))
                 for s in config.seeds}
    for spec in config.sweep:
        records = []
        for s in config.seeds:
            if (s, spec, everything) not in merge_scores:
                continue
            rows = [domain_means(merge_scores[s, spec, everything])]
            records.append(run_record(s, config.domains, rows, config.domains))
        add_gain(records, base_aa, bound_aa)
        ref_records = [run_record(s, config.domains, [domain_means(r)], config.domains)
                       for s, r in reference.items() if r is not None]
        out[spec] = {**summarise_runs(records), "paired_vs_default": paired(records, ref_records),
                     "failed_seeds": [s for s in config.seeds
                                      if (s, spec, everything) not in merge_scores],
                     "runs": records}
    return out


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = torch.tensor(sorted(values), dtype=torch.float64)
    qs = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
    return {str(q): float(torch.quantile(ordered, q)) for q in qs}


def _share(values: Sequence[float], limit: float) -> float:
    return sum(v <= limit for v in values) / len(values) if values else 0.0
