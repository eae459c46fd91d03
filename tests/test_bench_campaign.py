"""``regcl bench campaign``'s mechanics on the real stack the bench starts itself (redis-server,
a Celery worker process, the API process, the image origin): a tiny campaign (1 domain, 5
tasks, one continual step after 4, 2 held-out tasks, 1 seed). Checks that every task was
clicked and its annotation stored, that the step ran on the annotations, that per-project
serving answered with the version the project record names, and that the report has its
fields; never how fast anything is, nor whether the goal is met."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.bench_campaign import CampaignConfig, run_campaign
from cli.bench_campaign.figure import campaign_figure
from cli.bench_campaign.report import campaign_markdown, write_json
from regcl.evaluation.clicks import CLICK_CAP

pytestmark = pytest.mark.slow


def test_a_tiny_campaign_over_the_real_stack(tmp_path: Path) -> None:
    config = CampaignConfig(domains=("polyp",), seeds=(0,), tasks=5, heldout=2, train_every=4,
                            epochs=1, batch_size=4)
    lines: list[str] = []
    report = run_campaign(config, work_root=tmp_path, say=lines.append,
                          partial_stem=tmp_path / "campaign")
    (seed,) = report["seeds"]
    polyp = seed["domains"]["polyp"]
    # every task clicked (at least the protocol's 5 clicks, at most its cap) and stored
    assert polyp["tasks"] == 5 and polyp["annotations_stored"] == 5
    assert all(5 <= c <= CLICK_CAP for c in polyp["clicks"]), polyp["clicks"]
    # one continual step, on the 4 annotations made before it
    (step,) = polyp["steps"]
    assert step["state"] == "succeeded" and step["after_tasks"] == 4, step
    assert step["annotations"] == 4, step
    # per-project serving answered with what the project record says serves it
    record, project = polyp["project_record"], polyp["after"]["project"]
    assert record["project"] == 1 and record["domain"] == "polyp"
    if record["serves"] == "domain":
        assert project["versions"] == [record["model_version"]], (record, project)
        assert record["model_version"].startswith("domain:polyp-s1@")
    else:  # auto: each held-out image routed, to the step's adapter or to live
        assert all(v.startswith(("domain:polyp-s1@", "live:")) for v in project["versions"])
    assert polyp["base"]["versions"] == ["base"]
    assert all(v.startswith("live:") for v in polyp["after"]["live"]["versions"])
    # the report: every arm's row, the goal lines, timings; JSON, markdown and the figure
    for arm in ("base", "live", "project"):
        assert set(report["table"][arm]["polyp"]) == {
            "noc@85", "noc@90", "iou@1", "iou@3", "iou@5"}
        assert 1 <= report["table"][arm]["polyp"]["noc@85"]["mean"] <= CLICK_CAP
    for arm in ("live", "project"):
        assert {"reduction", "reduction_mean", "reduction_met", "forgetting_worst",
                "forgetting_met"} <= set(report["goal"][arm])
    assert report["timings"]["steps"] == 1 and report["timings"]["tasks"] == 5
    write_json(report, tmp_path / "campaign.json")
    loaded = json.loads((tmp_path / "campaign.json").read_text())
    assert loaded["config"]["tasks"] == 5 and len(loaded["seeds"]) == 1
    assert json.loads((tmp_path / "campaign.seed0.partial.json").read_text())["domains"]
    assert "| project | polyp |" in campaign_markdown(report)
    campaign_figure(report, tmp_path / "campaign.png")
    assert (tmp_path / "campaign.png").stat().st_size > 1000
    assert any("step succeeded" in line for line in lines), lines
