"""Combine ``regcl bench interactive`` reports of disjoint seeds (same settings) into one:
every row's per-seed figures pooled and summarised (95 % t-intervals) as the bench does, the
paired arm − recipe differences over all the seeds; prints the bench's tables.

    python scripts/combine_interactive.py OUT.json A.json B.json [...]

(how docs/bench-interactive-paper.json was made from two runs, seeds 0-2 and 3-4)."""
import json
import sys
from pathlib import Path

from regcl.bench.cl_report import mean_ci
from regcl.bench.interactive import MODES, PAIRED, interactive_tables

out_path, paths = sys.argv[1], sys.argv[2:]
reports = [json.loads(Path(p).read_text()) for p in paths]
base = reports[0]
for r in reports[1:]:
    a = {k: v for k, v in r["config"].items() if k not in ("seeds",)}
    b = {k: v for k, v in base["config"].items() if k not in ("seeds",)}
    if a != b:
        sys.exit(f"{paths[0]} and another report differ in their settings")
results = {}
for name in base["results"]:
    results[name] = {}
    for mode in MODES:
        seeds = {}
        for r in reports:
            seeds.update(r["results"][name][mode]["per_seed"])
        first = next(iter(seeds.values()))
        mean = {k: mean_ci([f["mean"][k] for f in seeds.values()]) for k in first["mean"]}
        per_domain = {d: {k: mean_ci([f["per_domain"][d][k] for f in seeds.values()])
                          for k in first["per_domain"][d]} for d in first["per_domain"]}
        results[name][mode] = {"mean": mean, "per_domain": per_domain, "per_seed": seeds}
paired = {}
for name in results:
    if not name.endswith("[interactive:4]"):
        continue
    ref = results[name.replace("[interactive:4]", "[recipe]")]
    row = {}
    for mode, key in PAIRED:
        ours, theirs = results[name][mode]["per_seed"], ref[mode]["per_seed"]
        diffs = [ours[s]["mean"][key] - theirs[s]["mean"][key] for s in ours]
        row[f"{mode} {key}"] = {**mean_ci(diffs), "per_seed": diffs}
    paired[name] = row
config = dict(base["config"])
config["seeds"] = sorted(int(s) for s in results["base"]["feedback"]["per_seed"])
report = {"config": config, "interval": base["interval"], "protocol": base["protocol"],
          "results": results, "paired": paired,
          "elapsed_s": round(sum(r["elapsed_s"] for r in reports), 1),
          "runs": [{"seeds": r["config"]["seeds"], "elapsed_s": r["elapsed_s"],
                    "machine": r["machine"]} for r in reports],
          "machine": base["machine"]}
Path(out_path).write_text(json.dumps(report, indent=1))
print(interactive_tables(report))
