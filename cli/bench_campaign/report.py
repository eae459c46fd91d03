"""The campaign's report: per-seed results averaged over seeds (mean ± 95 % t-interval), the
goal lines of issue #22, the markdown tables and the JSON."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from cli.bench_campaign.config import GOAL_FORGET, GOAL_REDUCTION, CampaignConfig
from regcl.bench.cl_output import jsonable
from regcl.bench.cl_report import mean_ci

__all__ = ["campaign_markdown", "resummarise", "summarise", "summarise_partials",
           "write_json"]

METRICS = ("noc@85", "noc@90", "iou@1", "iou@3", "iou@5")
ARMS_AFTER = ("base", "live", "project")
LEARNING_ARMS = ("live", "project")
WINDOW_METRICS = ("noc@85", "noc@90", "iou@1", "iou@5")


def _score(seed: dict[str, Any], domain: str, arm: str) -> dict[str, float]:
    entry = seed["domains"][domain]
    return entry["base"] if arm == "base" else entry["after"][arm]


def _table(config: CampaignConfig, seeds: list[dict]) -> dict[str, Any]:
    return {arm: {d: {m: mean_ci([_score(s, d, arm)[m] for s in seeds]) for m in METRICS}
                  for d in config.domains} for arm in ARMS_AFTER}


def _windows(config: CampaignConfig, seeds: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in LEARNING_ARMS:
        out[arm] = {d: [{"tasks": w["tasks"], **{m: mean_ci(
            [s["domains"][d]["windows"][k][arm][m] for s in seeds]) for m in WINDOW_METRICS}}
            for k, w in enumerate(seeds[0]["domains"][d]["windows"])] for d in config.domains}
    out["base"] = {d: {m: mean_ci([s["domains"][d]["base"][m] for s in seeds])
                       for m in WINDOW_METRICS} for d in config.domains}
    out["annotator"] = {d: [{"tasks": w["tasks"], "noc@90": mean_ci(
        [s["domains"][d]["stream_windows"][k]["noc@90"] for s in seeds]), "noc@85": mean_ci(
        [s["domains"][d]["stream_windows"][k]["noc@85"] for s in seeds])}
        for k, w in enumerate(seeds[0]["domains"][d]["stream_windows"])]
        for d in config.domains}
    return out


def _change(before: float, after: float) -> float:
    return after / before - 1.0


def _goal(config: CampaignConfig, seeds: list[dict]) -> dict[str, Any]:
    """Reduction of NoC@85 vs base after each domain's tasks; change of NoC@85 on each earlier
    domain after each later one, relative to its value after its own tasks."""
    goal: dict[str, Any] = {"tasks": config.tasks, "reduction_goal": GOAL_REDUCTION,
                            "forgetting_goal": GOAL_FORGET}
    for arm in LEARNING_ARMS:
        per_domain = {d: [1.0 - _score(s, d, arm)["noc@85"] / _score(s, d, "base")["noc@85"]
                          for s in seeds] for d in config.domains}
        mean_over_domains = [statistics.fmean(v[i] for v in per_domain.values())
                             for i in range(len(seeds))]
        pairs: dict[str, dict[str, Any]] = {}
        worst_per_seed = []
        for s in seeds:
            changes = []
            for later in config.domains:
                for old, scores in s["domains"][later]["earlier"].items():
                    change = _change(_score(s, old, arm)["noc@85"], scores[arm]["noc@85"])
                    pairs.setdefault(f"{old} after {later}", {"values": []})["values"].append(
                        change)
                    changes.append(change)
            worst_per_seed.append(max(changes) if changes else None)
        for entry in pairs.values():
            entry.update(mean_ci(entry["values"]))
        reduction = mean_ci(mean_over_domains)
        worst = mean_ci([w for w in worst_per_seed if w is not None])
        domains_met = sum(statistics.fmean(v) >= GOAL_REDUCTION for v in per_domain.values())
        goal[arm] = {
            "reduction": {d: mean_ci(v) for d, v in per_domain.items()},
            "reduction_mean": reduction, "domains_meeting_reduction": domains_met,
            "reduction_met": reduction["mean"] is not None
            and reduction["mean"] >= GOAL_REDUCTION,
            "forgetting": pairs, "forgetting_worst": worst,
            "forgetting_met": worst["mean"] is None or worst["mean"] <= GOAL_FORGET}
    return goal


def _timings(seeds: list[dict]) -> dict[str, Any]:
    steps = [st["seconds"] for s in seeds for d in s["domains"].values() for st in d["steps"]]
    tasks = [t for s in seeds for d in s["domains"].values() for t in d["task_seconds"]]
    return {"seed_s": mean_ci([s["seconds"] for s in seeds if "seconds" in s]),
            "step_s": mean_ci(steps),
            "task_s": mean_ci(tasks), "steps": len(steps), "tasks": len(tasks)}


def summarise(config: CampaignConfig, seeds: list[dict], *, elapsed_s: float, machine: str
              ) -> dict[str, Any]:
    return {"benchmark": "regcl bench campaign", "config": dataclasses.asdict(config),
            "arms": {"base": "POST /v1/segment adapter=base, points only (static base SAM)",
                     "live": "POST /v1/segment adapter=live, points only (the live merge)",
                     "project": "POST /labelstudio/predict for the domain's project "
                                "(per-project serving; keypoint contexts of all clicks)"},
            "interval": "mean ± half-width of the 95 % t-interval over seeds",
            "table": _table(config, seeds), "windows": _windows(config, seeds),
            "goal": _goal(config, seeds), "timings": _timings(seeds),
            "elapsed_s": elapsed_s, "machine": machine, "seeds": seeds}


def _config_of(data: dict[str, Any], **overrides: Any) -> CampaignConfig:
    fields = {f.name for f in dataclasses.fields(CampaignConfig)}
    return CampaignConfig(**{**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in data.items() if k in fields}, **overrides})


def resummarise(report: dict[str, Any]) -> dict[str, Any]:
    """A report's tables computed again from its seeds (what this code version reports)."""
    again = summarise(_config_of(report["config"]), report["seeds"],
                      elapsed_s=report["elapsed_s"], machine=report["machine"])
    return {**report, **{k: again[k] for k in ("table", "windows", "goal", "timings")}}


def summarise_partials(paths: list[Path]) -> dict[str, Any]:
    """The report of an unfinished run from its seeds' partial files
    (``<json>.seed<k>.partial.json``): the domains every seed finished, those seeds."""
    seeds = [json.loads(Path(p).read_text()) for p in paths]
    order = seeds[0]["config"]["domains"]
    done = [d for d in order if all(d in s["domains"] for s in seeds)]
    if not done:
        raise ValueError("no domain is finished in every partial file")
    config = _config_of(seeds[0]["config"], domains=tuple(done),
                        seeds=tuple(s["seed"] for s in seeds))
    for s in seeds:
        s["domains"] = {d: s["domains"][d] for d in done}
    report = summarise(config, seeds, elapsed_s=0.0, machine="partial: see the seeds")
    report["partial"] = {"files": [str(p) for p in paths], "domains": done}
    return report


def _cell(stat: dict[str, Any], digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
    if stat.get("mean") is None:
        return "–"
    text = f"{stat['mean'] * scale:.{digits}f}"
    if stat.get("ci95") is not None:
        text += f" ± {stat['ci95'] * scale:.{digits}f}"
    return text + unit


def campaign_markdown(report: dict[str, Any]) -> str:
    """The table (arm x domain after its tasks), the forgetting table and the goal lines."""
    config = report["config"]
    lines = ["| arm | domain | NoC@85 | NoC@90 | IoU@1 | IoU@3 | IoU@5 |",
             "|---|---|---|---|---|---|---|"]
    for arm, rows in report["table"].items():
        for domain, stats in rows.items():
            lines.append(f"| {arm} | {domain} | " + " | ".join(
                _cell(stats[m], 2 if m.startswith("noc") else 3) for m in METRICS) + " |")
    goal = report["goal"]
    forget = ["", "| arm | earlier domain, after | NoC@85 change |", "|---|---|---|"]
    verdict = [""]
    for arm in LEARNING_ARMS:
        g = goal[arm]
        for pair, stat in g["forgetting"].items():
            forget.append(f"| {arm} | {pair} | {_cell(stat, 1, 100, ' %')} |")
        red, worst = g["reduction_mean"], g["forgetting_worst"]
        verdict.append(
            f"- **{arm}**: NoC@85 after {goal['tasks']} tasks is "
            f"{_cell(red, 1, 100, ' %')} below base (mean over domains; goal ≥ "
            f"{GOAL_REDUCTION:.0%}: {'met' if g['reduction_met'] else 'missed'} by "
            f"{abs((red['mean'] or 0) - GOAL_REDUCTION) * 100:.1f} points; "
            f"{g['domains_meeting_reduction']}/{len(config['domains'])} domains meet it); "
            f"worst change on an earlier domain {_cell(worst, 1, 100, ' %')} (goal ≤ "
            f"+{GOAL_FORGET:.0%}: {'met' if g['forgetting_met'] else 'missed'}"
            + (f" by {abs(worst['mean'] - GOAL_FORGET) * 100:.1f} points"
               if worst.get("mean") is not None else "") + ").")
    annotator = ["", "| annotator's clicks (project arm), tasks | " + " | ".join(
        config["domains"]) + " |", "|---|" + "---|" * len(config["domains"])]
    windows = report["windows"]["annotator"]
    for k, w in enumerate(windows[config["domains"][0]]):
        for metric in ("noc@85", "noc@90"):
            annotator.append(f"| {metric.upper().replace('NOC', 'NoC')}, tasks "
                             f"{w['tasks'][0] + 1}-{w['tasks'][1]} | " + " | ".join(
                                 _cell(windows[d][k][metric]) for d in config["domains"]) + " |")
    t = report["timings"]
    footer = (f"\n{len(config['seeds'])} seed(s), {len(config['domains'])} domains × "
              f"{config['tasks']} tasks ({config['heldout']} held out), a step every "
              f"{config['train_every']} tasks ({config['epochs']} epochs, rank "
              f"{config['rank']}); one step {_cell(t['step_s'], 1)} s, one task "
              f"{_cell(t['task_s'], 2)} s, one seed {_cell(t['seed_s'], 0)} s; "
              f"{report['elapsed_s']:.0f} s on {report['machine']}. {report['interval']}.")
    return "\n".join(lines + forget + annotator + verdict) + "\n" + footer


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(jsonable(report), indent=1) + "\n")
