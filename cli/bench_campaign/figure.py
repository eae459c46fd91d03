"""The campaign's figure: NoC@90 on the current domain's held-out tasks against tasks labelled
(the whole campaign on one axis, a domain after another), per arm, mean over seeds with the
95 % interval as a band."""

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
    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=90)
    for index, domain in enumerate(config["domains"]):
        offset = index * config["tasks"]
        base = windows["base"][domain]["noc@90"]["mean"]
        ax.hlines(base, offset, offset + config["tasks"], colors=COLOURS["base"],
                  label="static base" if index == 0 else None)
        for arm in ("live", "project"):
            points = windows[arm][domain]
            xs = [offset + p["tasks"] for p in points]
            mean = [p["noc@90"]["mean"] for p in points]
            half = [p["noc@90"]["ci95"] or 0.0 for p in points]
            ax.plot(xs, mean, marker="o", markersize=3, color=COLOURS[arm],
                    label=f"{arm} merge" if arm == "live" and index == 0 else
                    ("per-project serving" if index == 0 and arm == "project" else None))
            ax.fill_between(xs, [m - h for m, h in zip(mean, half, strict=True)],
                            [m + h for m, h in zip(mean, half, strict=True)],
                            color=COLOURS[arm], alpha=0.15, linewidth=0)
        ax.axvline(offset, color="#dddddd", linewidth=0.8)
        ax.text(offset + 1, 0.3, domain, fontsize=7, color="#555555")
    ax.set_xlabel("tasks labelled (projects in sequence)")
    ax.set_ylabel("NoC@90 on held-out tasks")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(f"regcl bench campaign: {len(config['seeds'])} seed(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
