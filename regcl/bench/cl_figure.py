"""The figure of ``regcl bench cl --figure``: AA, forgetting, the gap to the individual
adapters and routing accuracy against the number of domains learnt (matplotlib, a dev extra;
imported only here, when a figure is asked for)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from regcl.bench.cl_report import sequence_curves

PANELS = (("AA", "AA (IoU) over the domains seen ↑"),
          ("FM", "forgetting FM ↓"),
          ("gap", "gap to the individual adapters ↓"))


def sequence_figure(report: Mapping[str, Any], path: str) -> None:
    """Writes a 2 x 2 PNG: one line per method (mean over seeds, 95 % interval shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = sequence_curves(report)
    count = len(report["config"]["domains"])
    steps = list(range(1, count + 1))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=110)
    for ax, (metric, title) in zip(axes.flat, PANELS):
        for name, per_t in curves.items():
            if metric in per_t:
                _line(ax, steps, per_t[metric], name)
        ax.set_title(title)
    ax = axes.flat[3]
    _line(ax, steps, curves["routing"]["accuracy"], "best domain right")
    _line(ax, steps, curves["routing"]["taken"], "route taken (not the fallback)")
    ax.set_title("router, over the seen domains' test images")
    for ax in axes.flat:
        ax.set_xlabel("domains learnt")
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    seeds = report["config"]["seeds"]
    fig.suptitle(f"{count} domains: {' → '.join(report['config']['domains'])}\n"
                 f"tiny SAM, {len(seeds)} seed(s), mean and 95 % t-interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _line(ax: Any, steps: list[int], values: list[Mapping[str, Any]], label: str) -> None:
    means = [v["mean"] for v in values]
    ax.plot(steps, means, marker="o", markersize=3, label=label)
    if all(v.get("ci95") is not None for v in values):
        ax.fill_between(steps, [m - v["ci95"] for m, v in zip(means, values)],
                        [m + v["ci95"] for m, v in zip(means, values)], alpha=0.15)
