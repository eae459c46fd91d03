"""The campaign's figure: NoC@90 (left) and IoU after 5 clicks (right) on the current domain's
held-out tasks against tasks labelled (the whole campaign on one axis, a domain after another),
per arm, mean over seeds with the 95 % interval as a band; static base as a flat line per
domain. (With the tiny SAM, NoC@90 sits at the 20-click cap: IoU@5 shows what moves.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["campaign_figure"]

COLOURS = {"base": "#888888", "live": "#1f77b4", "project": "#d62728"}


def campaign_figure(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, windows = report["config"], report["windows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), dpi=80)
    for ax, metric, label in ((axes[0], "noc@90", "NoC@90"), (axes[1], "iou@5", "IoU@5")):
        for index, domain in enumerate(config["domains"]):
            offset = index * config["tasks"]
            base = windows["base"][domain].get(metric, {}).get("mean")
            if base is not None:
                ax.hlines(base, offset, offset + config["tasks"], colors=COLOURS["base"],
                          label="static base" if index == 0 else None)
            for arm, name in (("live", "live merge"), ("project", "per-project serving")):
                points = [p for p in windows[arm][domain] if metric in p]
                xs = [offset + p["tasks"] for p in points]
                mean = [p[metric]["mean"] for p in points]
                half = [p[metric]["ci95"] or 0.0 for p in points]
                ax.plot(xs, mean, marker="o", markersize=3, color=COLOURS[arm],
                        label=name if index == 0 else None)
                ax.fill_between(xs, [m - h for m, h in zip(mean, half, strict=True)],
                                [m + h for m, h in zip(mean, half, strict=True)],
                                color=COLOURS[arm], alpha=0.15, linewidth=0)
            ax.axvline(offset, color="#dddddd", linewidth=0.8)
            ax.text(offset + 1, 0.02 if metric.startswith("iou") else 0.5, domain, fontsize=7,
                    color="#555555")
        ax.set_xlabel("tasks labelled (projects in sequence)")
        ax.set_ylabel(f"{label} on held-out tasks")
        ax.set_ylim(0, 21 if metric.startswith("noc") else 1)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"regcl bench campaign: {len(config['seeds'])} seed(s), mean ± 95 % "
                 "interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
