"""Summaries with intervals and the markdown tables of ``regcl bench cl``.

Interval: the 95 % Student-t interval of a mean, ``mean ± t(0.975, n−1) · sd / √n`` over the
seeds, n the number of seeds. A seed (its data, adapters and prompts) is the independent unit:
a row's runs of one seed (one per domain order; one in all for rows that do not depend on the
order, such as the base model) are averaged first. Runs of different orders share a seed's
data and adapters, and a merge of all the domains does not depend on their order at all, so
counting them as separate samples would narrow the interval without new evidence. Paired
differences subtract the reference row's run of the same seed and order (same data, same
adapters), then average per seed the same way.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

SUMMARY_METRICS = ("AA", "FM", "FT", "final_dice", "final_mae", "gain_kept")


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Lentz's method)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log(1 - x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p in (0.5, 1)) of Student's t with ``df`` ≥ 1 degrees of freedom."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got {p}, {df}")

    def cdf(t: float) -> float:
        return 1 - 0.5 * _incomplete_beta(df / 2, 0.5, df / (df + t * t))

    low, high = 0.0, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def mean_ci(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, standard deviation and the half-width of its 95 % t-interval (None for n < 2)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "ci95": None, "sd": None, "n": 0}
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "ci95": None, "sd": None, "n": 1}
    sd = statistics.stdev(values)
    return {"mean": mean, "ci95": t_quantile(0.975, n - 1) * sd / math.sqrt(n), "sd": sd, "n": n}


def seed_means(values: Sequence[tuple[int, float]]) -> list[float]:
    """The mean of each seed's values (``(seed, value)`` pairs), in seed order."""
    by_seed: dict[int, list[float]] = {}
    for seed, value in values:
        by_seed.setdefault(seed, []).append(value)
    return [statistics.fmean(v) for _, v in sorted(by_seed.items())]


def summarise_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every summary metric of a row as :func:`mean_ci` over its seeds (each seed's runs
    averaged first), with ``runs`` the number of runs behind it."""
    out = {}
    for metric in SUMMARY_METRICS:
        values = [(r["seed"], r[metric]) for r in runs
                  if r.get(metric) is not None and math.isfinite(r[metric])]
        if values:
            out[metric] = {**mean_ci(seed_means(values)), "runs": len(values)}
    return out


def _run_key(run: Mapping[str, Any]) -> tuple:
    return run["seed"], tuple(run["order"])


def paired(runs: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]]
           ) -> dict[str, Any]:
    """Paired differences ``run − reference`` of AA, FM, FT and final Dice.

    Runs pair on (seed, order); a row without orders (one run per seed) pairs with the mean of
    the reference's runs of that seed. Also returns the per-seed means of the differences.
    """
    if not runs or not reference:
        return {}
    by_key = {_run_key(r): r for r in reference}
    by_seed: dict[int, list[Mapping[str, Any]]] = {}
    for r in reference:
        by_seed.setdefault(r["seed"], []).append(r)
    out: dict[str, Any] = {}
    for metric in ("AA", "FM", "FT", "final_dice"):
        diffs: list[tuple[int, float]] = []  # (seed, run - reference)
        for run in runs:
            if run.get(metric) is None:
                continue
            ref = by_key.get(_run_key(run))
            if ref is not None and ref.get(metric) is not None:
                value = ref[metric]
            elif run["seed"] in by_seed and len(by_seed[run["seed"]]) > 0:
                values = [r[metric] for r in by_seed[run["seed"]] if r.get(metric) is not None]
                if not values:
                    continue
                value = statistics.fmean(values)
            else:
                continue
            diffs.append((run["seed"], run[metric] - value))
        if diffs:
            per_seed = dict(zip(sorted({seed for seed, _ in diffs}), seed_means(diffs)))
            out[metric] = {**mean_ci(list(per_seed.values())), "runs": len(diffs),
                           "per_seed": {str(s): mean for s, mean in per_seed.items()}}
    return out


def cell(summary: Mapping[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    """``mean ± half-width`` (or ``–``)."""
    if not summary or summary.get("mean") is None:
        return "–"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(summary["mean"])
    return text if summary.get("ci95") is None else f"{text} ± {summary['ci95']:.{digits}f}"


def markdown_table(report: Mapping[str, Any]) -> str:
    """One row per method: AA / FM / FT / final Dice (IoU-based, mean ± 95 % interval), the
    paired AA difference against ``merge: regcl`` and the share of the individual adapters'
    gain over the base that the row keeps."""
    lines = ["| method | AA (IoU) ↑ | FM ↓ | FT ↑ | final Dice ↑ | ΔAA vs regcl (paired) "
             "| gain kept |", "|---|---|---|---|---|---|---|"]
    for name, row in report["results"].items():
        delta = row.get("paired_vs_regcl", {}).get("AA")
        gain = "–" if name in ("zero-shot base", "individual adapters") else cell(
            row.get("gain_kept"), 2)
        lines.append(f"| {name} | {cell(row.get('AA'))} | {cell(row.get('FM'))} "
                     f"| {cell(row.get('FT'))} | {cell(row.get('final_dice'))} "
                     f"| {'–' if name == 'merge: regcl' else cell(delta, signed=True)} "
                     f"| {gain} |")
    return "\n".join(lines)


def per_domain_table(report: Mapping[str, Any]) -> str:
    """Final IoU per domain (mean over runs) of every row."""
    domains = report["config"]["domains"]
    lines = ["| final IoU | " + " | ".join(domains) + " | mean |",
             "|---|" + "---|" * (len(domains) + 1)]
    for name, row in report["results"].items():
        runs = row["runs"]
        means = [statistics.fmean(r["final_per_domain"][d] for r in runs) for d in domains]
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means)
                     + f" | {statistics.fmean(means):.3f} |")
    return "\n".join(lines)


def sweep_table(report: Mapping[str, Any]) -> str:
    """The merge sweep: final AA and Dice, paired AA difference against the default merge."""
    default = report["config"]["default_method"]
    lines = [f"| merge (all domains) | AA (IoU) | final Dice | ΔAA vs {default} (paired) "
             "| gain kept |", "|---|---|---|---|---|"]
    for spec, row in report.get("sweep", {}).items():
        if not row.get("runs"):
            lines.append(f"| {spec} | failed (seeds {row['failed_seeds']}) | – | – | – |")
            continue
        delta = row.get("paired_vs_default", {}).get("AA")
        lines.append(f"| {spec} | {cell(row.get('AA'))} | {cell(row.get('final_dice'))} "
                     f"| {'–' if spec == default else cell(delta, signed=True)} "
                     f"| {cell(row.get('gain_kept'), 2)} |")
    return "\n".join(lines)


def sequence_curves(report: Mapping[str, Any]) -> dict[str, dict[str, list]]:
    """AA, FM, the gap to the individual adapters and routing accuracy after t = 1..T domains
    of the first order (the sequence as given), mean ± interval over seeds, for sequential
    fine-tuning, ``regcl``, the default merge and ``auto``.

    After t domains: AA_t = mean over the t domains seen of their score; FM_t = mean over the
    first t−1 of (score right after learning it − score now); gap_t = mean over the t seen of
    (own individual adapter − score now); routing accuracy over the seen domains' test images.
    """
    order = report["config"]["domains"]
    default = report["config"]["default_method"]
    results = report["results"]
    own = {r["seed"]: r["final_per_domain"] for r in results["individual adapters"]["runs"]}
    names = ["sequential fine-tuning", "merge: regcl", f"merge: {default}"]
    names += [n for n in results if n.startswith("auto")]
    curves: dict[str, dict[str, list]] = {}
    for name in dict.fromkeys(names):
        runs = [r for r in results.get(name, {}).get("runs", [])
                if r["order"] == list(order) and len(r["iou"]) == len(order)]
        if not runs:
            continue
        per_t: dict[str, list] = {"AA": [], "FM": [], "gap": []}
        for t in range(1, len(order) + 1):
            aa, fm, gap = [], [], []
            for r in runs:
                row = r["iou"][t - 1]
                aa.append(statistics.fmean(row[:t]))
                gap.append(statistics.fmean(own[r["seed"]][d] - row[j]
                                            for j, d in enumerate(order[:t])))
                if t > 1:
                    fm.append(statistics.fmean(r["iou"][j][j] - row[j] for j in range(t - 1)))
            per_t["AA"].append(mean_ci(aa))
            per_t["FM"].append(mean_ci(fm) if fm else mean_ci([0.0] * len(runs)))
            per_t["gap"].append(mean_ci(gap))
        curves[name] = per_t
    steps = [s for s in report["routing"]["steps"] if s["order"] == list(order)]
    curves["routing"] = {"accuracy": [mean_ci([s["accuracy"] for s in steps if s["domains"] == t])
                                      for t in range(1, len(order) + 1)],
                         "taken": [mean_ci([s["taken"] for s in steps if s["domains"] == t])
                                   for t in range(1, len(order) + 1)]}
    return curves


def curves_table(report: Mapping[str, Any]) -> str:
    """:func:`sequence_curves` as one markdown table (columns: number of domains)."""
    curves = sequence_curves(report)
    count = len(report["config"]["domains"])
    lines = ["| after t domains | " + " | ".join(str(t) for t in range(1, count + 1)) + " |",
             "|---|" + "---|" * count]
    for name, per_t in curves.items():
        for metric, values in per_t.items():
            lines.append(f"| {name}: {metric} | "
                         + " | ".join(cell(v, 3) for v in values) + " |")
    return "\n".join(lines)


def routing_table(report: Mapping[str, Any]) -> str:
    """Routing over all domains: accuracy, margins, and auto's AA by margin threshold."""
    routing = report["routing"]
    q = routing["margin_quantiles"]
    accuracy = routing["accuracy_all_domains"]
    per_seed = ", ".join(f"{a:.4f}" for a in accuracy["per_seed"])
    lines = [f"routing accuracy (best domain, all {len(report['config']['domains'])} domains): "
             f"{accuracy['mean']:.4f} (per seed {per_seed}); "
             f"{q['wrong_count']} of {q['count']} images routed to a wrong domain",
             "", "| min margin | auto AA | routes taken |", "|---|---|---|"]
    for row in routing["auto_by_min_margin"]:
        lines.append(f"| {row['min_margin']} | {row['AA']:.4f} | {row['taken']:.4f} |")
    return "\n".join(lines)
