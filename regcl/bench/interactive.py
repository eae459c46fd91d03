"""``regcl bench interactive``: more clicks, better masks? The click protocol
(:mod:`regcl.evaluation.clicks`) on the synthetic domains, over seeds, with intervals.

Rows: the base model (on every target domain and on the source domain), each domain's
individual adapter (on its own domain), the default merge of all the domains' adapters and
``auto`` (each test image routed to its domain's adapter, else the merge), each with mask
feedback and points only. Columns: IoU after 1/3/5/10 clicks, NoC@80/85/90 (capped at
``max_clicks``) and the plain protocol's IoU (3 random positive points, the ``regcl bench cl``
score; its mean over domains is AA).

*Arms*: the adapters are trained once per arm, ``0`` being the paper's recipe and ``r`` > 0 the
interactive simulation with ``r`` correction rounds (:mod:`regcl.training.interactive`), on the
same data, initial weights, batches and first prompts; paired differences (arm − recipe, per
seed) say what the simulation changes. The base does not depend on the arm.

The work runs as :mod:`regcl.bench.cl_worker` jobs, so the trained-adapter cache and the
worker processes of ``regcl bench cl`` apply; the numbers do not depend on ``workers``.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from regcl.bench.cl import JobRunner, merge_steps
from regcl.bench.cl_config import BenchConfig, config_json
from regcl.bench.cl_report import cell, mean_ci
from regcl.bench.cl_worker import BenchWorker
from regcl.data.domains import PAPER_ORDER
from regcl.errors import ConfigError
from regcl.evaluation.clicks import CLICK_CAP, IOU_AFTER, NOC_THRESHOLDS, interactive_summary
from regcl.routing import decide
from regcl.training.adapter import TrainConfig

__all__ = ["InteractiveBenchConfig", "combine_reports", "interactive_tables",
           "run_interactive_benchmark"]

logger = logging.getLogger(__name__)

MODES = ("feedback", "points")
SOURCE = "source"
Curves = dict[str, dict[str, torch.Tensor]]  # domain -> feedback / points / plain -> per image


@dataclass(frozen=True)
class InteractiveBenchConfig:
    """bench: data, seeds, adapter and training settings (its ``train.interactive_rounds`` is
    replaced by each arm's); arms: interactive rounds of each arm's adapter training (none:
    the base model alone)."""

    bench: BenchConfig = field(default_factory=lambda: BenchConfig(seeds=(0, 1, 2)))
    arms: tuple[int, ...] = (0, 4)
    max_clicks: int = CLICK_CAP

    def __post_init__(self) -> None:
        if len(set(self.arms)) != len(self.arms) or min(self.arms, default=0) < 0:
            raise ConfigError(f"arms must be distinct rounds >= 0, got {self.arms}")
        if self.max_clicks < max(IOU_AFTER):
            raise ConfigError(f"max_clicks must be >= {max(IOU_AFTER)}, got {self.max_clicks}")

    @classmethod
    def quick(cls) -> InteractiveBenchConfig:
        """A smoke run of a few minutes: 2 domains, 2 seeds, few images, two epochs."""
        return cls(BenchConfig(domains=PAPER_ORDER[:2], seeds=(0, 1), train_per_domain=16,
                               test_per_domain=8, train=TrainConfig(epochs=2)))


def arm_config(config: InteractiveBenchConfig, rounds: int) -> BenchConfig:
    return dataclasses.replace(config.bench, train=dataclasses.replace(
        config.bench.train, interactive_rounds=rounds))


def arm_name(rounds: int) -> str:
    return "recipe" if rounds == 0 else f"interactive:{rounds}"


def run_interactive_benchmark(config: InteractiveBenchConfig,
                              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every arm; returns the JSON-ready report (per-seed figures, summaries, pairs)."""
    say = progress or (lambda msg: logger.info("%s", msg))
    start = time.monotonic()
    bench = config.bench
    threads_before = torch.get_num_threads()
    torch.set_num_threads(bench.threads)  # the merges run here
    rows: dict[str, dict[int, Curves]] = {}  # row name -> seed -> curves
    # In one process, the arms share a worker: its data and encoder prefixes are the same.
    shared = BenchWorker(bench) if bench.workers == 1 else None
    try:
        with JobRunner(bench, say, shared) as runner:
            rows["base"] = _run_base(config, runner)
        for rounds in config.arms:
            arm = arm_config(config, rounds)
            local = None if shared is None else shared.reconfigured(arm)
            with JobRunner(arm, say, local) as runner:
                rows.update(_run_arm(config, rounds, runner))
    finally:
        torch.set_num_threads(threads_before)
    report = assemble(config, rows)
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    report["machine"] = (f"{platform.machine()}, {bench.workers} worker process(es) x "
                         f"{bench.threads} torch thread(s), torch {torch.__version__}, "
                         f"Python {platform.python_version()}")
    return report


def _run_base(config: InteractiveBenchConfig, runner: JobRunner) -> dict[int, Curves]:
    """The base model on every target domain and the source domain, per seed."""
    seeds, domains = config.bench.seeds, (*config.bench.domains, SOURCE)
    jobs = [("clicks", s, None, dict.fromkeys(domains), config.max_clicks) for s in seeds]
    return dict(zip(seeds, runner.map(jobs, "base")))


def _run_arm(config: InteractiveBenchConfig, rounds: int, runner: JobRunner
             ) -> dict[str, dict[int, Curves]]:
    bench, k = config.bench, config.max_clicks
    seeds, domains = bench.seeds, bench.domains
    jobs = [("individual", s, d) for s in seeds for d in domains]
    out = runner.map(jobs, f"{arm_name(rounds)}: adapters")
    trained = {(s, d): out[i] for i, (_, s, d) in enumerate(jobs)}
    merged = {s: merge_steps(bench.default_method, [trained[s, d][0] for d in domains],
                             [trained[s, d][1] for d in domains], domains)[-1] for s in seeds}
    jobs = [("route", s, {d: trained[s, d][1] for d in domains}) for s in seeds]
    jobs += [("clicks", s, trained[s, d][0], {d: None}, k) for s in seeds for d in domains]
    jobs += [("clicks", s, merged[s], dict.fromkeys(domains), k) for s in seeds]
    out = iter(runner.map(jobs, f"{arm_name(rounds)}: routing and clicks"))
    routes = {s: next(out) for s in seeds}
    own: dict[int, Curves] = {s: {} for s in seeds}
    for s in seeds:
        for _ in domains:
            own[s].update(next(out))
    merge = {s: next(out) for s in seeds}
    # auto: routed images to their adapter's curves, the rest to the merge's.
    plans = {s: _route_plan(bench, routes[s]) for s in seeds}
    extra = [(s, a, subsets) for s in seeds for a, subsets in _misrouted(plans[s], domains)]
    jobs = [("clicks", s, trained[s, a][0], subsets, k) for s, a, subsets in extra]
    out = runner.map(jobs, f"{arm_name(rounds)}: misrouted images") if jobs else []
    elsewhere = {(s, a): r for (s, a, _), r in zip(extra, out)}
    auto = {s: _auto_curves(plans[s], domains, own[s], merge[s], elsewhere, s) for s in seeds}
    name = arm_name(rounds)
    return {f"adapter (own domain) [{name}]": own,
            f"merge: {bench.default_method} [{name}]": merge, f"auto [{name}]": auto}


def _route_plan(bench: BenchConfig, route: Mapping[str, Any]) -> dict[str, list[str | None]]:
    """Per domain, per test image: the adapter's domain ``auto`` takes, or None (the merge)."""
    names = sorted(bench.domains)
    columns = [route["domains"].index(n) for n in names]
    plan = {}
    for domain in bench.domains:
        best, _, _, chosen = decide(route["scores"][domain][:, columns],
                                    route["novelty"][domain][:, columns],
                                    min_margin=bench.route_min_margin,
                                    max_novelty=bench.route_max_novelty)
        plan[domain] = [names[b] if c else None for b, c in zip(best.tolist(), chosen.tolist())]
    return plan


def _misrouted(plan: Mapping[str, list[str | None]], domains: Sequence[str]
               ) -> list[tuple[str, dict[str, list[int]]]]:
    """(adapter, {domain: test indices}) for images routed to another domain's adapter."""
    out: dict[str, dict[str, list[int]]] = {}
    for domain in domains:
        for i, chosen in enumerate(plan[domain]):
            if chosen is not None and chosen != domain:
                out.setdefault(chosen, {}).setdefault(domain, []).append(i)
    return sorted(out.items())


def _auto_curves(plan: Mapping[str, list[str | None]], domains: Sequence[str], own: Curves,
                 merge: Curves, elsewhere: Mapping[tuple[int, str], Curves], seed: int
                 ) -> Curves:
    out: Curves = {}
    for domain in domains:
        picked: dict[str, list[torch.Tensor]] = {key: [] for key in own[domain]}
        positions: dict[str, int] = {}
        for i, chosen in enumerate(plan[domain]):
            if chosen is None:
                source, row = merge[domain], i
            elif chosen == domain:
                source, row = own[domain], i
            else:
                source = elsewhere[seed, chosen][domain]
                row = positions[chosen] = positions.get(chosen, -1) + 1
            for key in picked:
                picked[key].append(source[key][row])
        out[domain] = {key: torch.stack(values) for key, values in picked.items()}
    return out


def _seed_figures(curves: Curves, domains: Sequence[str], mode: str) -> dict[str, Any]:
    """One seed of one row and mode: per domain the click summary and the plain IoU, and
    their means over ``domains`` (the domains the row has)."""
    per_domain = {}
    for d in domains:
        if d not in curves:
            continue
        figures = interactive_summary(curves[d][mode])
        figures["plain"] = float(curves[d]["plain"].mean())
        per_domain[d] = figures
    keys = next(iter(per_domain.values())).keys()
    targets = [d for d in per_domain if d != SOURCE]
    mean = {key: statistics.fmean(per_domain[d][key] for d in targets) for key in keys}
    return {"per_domain": per_domain, "mean": mean}


def assemble(config: InteractiveBenchConfig, rows: Mapping[str, Mapping[int, Curves]]
             ) -> dict[str, Any]:
    """Summaries over seeds (95 % t-intervals, :func:`regcl.bench.cl_report.mean_ci`) and
    paired arm − recipe differences."""
    domains = (*config.bench.domains, SOURCE)
    per_seed = {name: {mode: {str(s): _seed_figures(c, domains, mode)
                              for s, c in sorted(by_seed.items())} for mode in MODES}
                for name, by_seed in rows.items()}
    results = _summarise(per_seed)
    return {"config": {**config_json(config.bench), "arms": list(config.arms),
                       "max_clicks": config.max_clicks},
            "interval": "95 % Student-t interval of the mean over seeds; paired differences "
                        "per seed (same data, initial weights, batches and first prompts)",
            "protocol": "click 1 at the deepest point of the object; each next click at the "
                        "deepest point of the deeper error region (by maximum distance), "
                        "positive on a miss, negative on a spill; single-mask output; NoC@k "
                        f"capped at {config.max_clicks}",
            "results": results, "paired": _paired(config.arms, results)}


def _summarise(per_seed: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Row -> mode -> seed -> figures (:func:`_seed_figures`) to the report's results: each
    figure's mean and interval over seeds, overall and per domain, with the seeds' own."""
    results: dict[str, Any] = {}
    for name, modes in per_seed.items():
        results[name] = {}
        for mode, seeds in modes.items():
            first = next(iter(seeds.values()))
            summary = {key: mean_ci([f["mean"][key] for f in seeds.values()])
                       for key in first["mean"]}
            per_domain = {d: {key: mean_ci([f["per_domain"][d][key] for f in seeds.values()])
                              for key in first["per_domain"][d]} for d in first["per_domain"]}
            results[name][mode] = {"mean": summary, "per_domain": per_domain,
                                   "per_seed": dict(seeds)}
    return results


def combine_reports(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One report from reports of the same settings over disjoint seeds (runs split to fit a
    machine's time): every row's per-seed figures pooled, summarised and paired as one run's
    would be. Raises ConfigError for reports whose settings differ or whose seeds overlap."""
    if not reports:
        raise ConfigError("no reports to combine")
    first = reports[0]
    settings = {k: v for k, v in first["config"].items() if k != "seeds"}
    seen: set[str] = set()
    for i, report in enumerate(reports):
        if {k: v for k, v in report["config"].items() if k != "seeds"} != settings:
            raise ConfigError(f"report {i} differs from report 0 in its settings (other "
                              "than the seeds)")
        seeds = set(report["results"]["base"]["feedback"]["per_seed"])
        if seeds & seen:
            raise ConfigError(f"report {i} repeats seeds {sorted(seeds & seen, key=int)}")
        seen |= seeds
    per_seed = {name: {mode: dict(sorted(((s, f) for report in reports for s, f in
                                          report["results"][name][mode]["per_seed"].items()),
                                         key=lambda item: int(item[0])))
                       for mode in MODES} for name in first["results"]}
    results = _summarise(per_seed)
    return {**first, "config": {**first["config"], "seeds": sorted(int(s) for s in seen)},
            "results": results, "paired": _paired(first["config"]["arms"], results),
            "elapsed_s": round(sum(r["elapsed_s"] for r in reports), 1),
            "runs": [{"seeds": r["config"]["seeds"], "elapsed_s": r["elapsed_s"],
                      "machine": r["machine"]} for r in reports]}


PAIRED = (("feedback", "iou@1"), ("feedback", "noc@85"), ("feedback", "iou@5"),
          ("points", "noc@85"), ("feedback", "plain"))


def _paired(arms: Sequence[int], results: Mapping[str, Any]) -> dict[str, Any]:
    """Each interactive arm's rows minus the recipe arm's, per seed: the figures of
    :data:`PAIRED` (mean over domains)."""
    if 0 not in arms:
        return {}
    out: dict[str, Any] = {}
    for rounds in arms:
        if rounds == 0:
            continue
        for name in results:
            if not name.endswith(f"[{arm_name(rounds)}]"):
                continue
            reference = results[name.replace(f"[{arm_name(rounds)}]", "[recipe]")]
            row = {}
            for mode, key in PAIRED:
                ours, ref = results[name][mode]["per_seed"], reference[mode]["per_seed"]
                diffs = [ours[s]["mean"][key] - ref[s]["mean"][key] for s in ours]
                row[f"{mode} {key}"] = {**mean_ci(diffs), "per_seed": diffs}
            out[name] = row
    return out


HEADER = ["IoU@1", "IoU@3", "IoU@5", "IoU@10", "NoC@80", "NoC@85", "NoC@90",
          "3 random points (AA)"]
KEYS = [*(f"iou@{k}" for k in IOU_AFTER), *(f"noc@{round(t * 100)}" for t in NOC_THRESHOLDS),
        "plain"]


def _digits(key: str) -> int:
    return 2 if "noc" in key else 3


def interactive_tables(report: Mapping[str, Any]) -> str:
    """The report as markdown: the mean over the target domains per row and mode, the base
    on the source domain, NoC@85 per domain, and the paired arm differences."""
    results = report["results"]
    lines = ["| model | mask feedback | " + " | ".join(HEADER) + " |",
             "|---|---|" + "---|" * len(HEADER)]
    for name, row in results.items():
        for mode in MODES:
            lines.append(f"| {name} | {'yes' if mode == 'feedback' else 'no'} | "
                         + " | ".join(cell(row[mode]["mean"].get(k), _digits(k)) for k in KEYS)
                         + " |")
    parts = ["\n".join(lines)]
    if "base" in results and SOURCE in results["base"]["feedback"]["per_domain"]:
        lines = ["| base on the source domain | mask feedback | " + " | ".join(HEADER) + " |",
                 "|---|---|" + "---|" * len(HEADER)]
        for mode in MODES:
            figures = results["base"][mode]["per_domain"][SOURCE]
            lines.append(f"| base | {'yes' if mode == 'feedback' else 'no'} | "
                         + " | ".join(cell(figures.get(k), _digits(k)) for k in KEYS) + " |")
        parts.append("\n".join(lines))
    domains = report["config"]["domains"]
    lines = ["| NoC@85, mask feedback | " + " | ".join(domains) + " |",
             "|---|" + "---|" * len(domains)]
    for name, row in results.items():
        per = row["feedback"]["per_domain"]
        lines.append(f"| {name} | " + " | ".join(cell(per.get(d, {}).get("noc@85"), 2)
                                               for d in domains) + " |")
    parts.append("\n".join(lines))
    if report.get("paired"):
        keys = [f"{m} {k}" for m, k in PAIRED]
        lines = ["| paired: arm − recipe | " + " | ".join(keys) + " |",
                 "|---|" + "---|" * len(keys)]
        for name, row in report["paired"].items():
            lines.append(f"| {name} | " + " | ".join(
                cell(row[k], _digits(k), signed=True) for k in keys) + " |")
        parts.append("\n".join(lines))
    seeds = report["config"]["seeds"]
    parts.append(f"{len(seeds)} seed(s) {tuple(seeds)}, {len(domains)} domains, "
                 f"{report['config']['test_per_domain']} test images per domain, "
                 f"{report.get('elapsed_s', 0):.0f} s on {report.get('machine', '?')}. "
                 f"{report['interval']}. Protocol: {report['protocol']}.")
    return "\n\n".join(parts)
