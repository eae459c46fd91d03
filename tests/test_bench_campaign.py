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


def _scores(noc85: float) -> dict:
    return {"noc@85": noc85, "noc@90": 20.0, "iou@1": 0.5, "iou@3": 0.6, "iou@5": 0.7}


def _fake_seed(seed: int, live_b: float, later_a: float) -> dict:
    """Two domains a, b: base NoC@85 20 on both; live reaches 15 on a and ``live_b`` on b;
    a's NoC@85 after b is ``later_a`` (project arm: the same numbers)."""
    def domain(after: float, earlier: dict) -> dict:
        window = {"tasks": 2, "live": _scores(after), "project": _scores(after)}
        return {"base": _scores(20.0), "after": {"live": _scores(after),
                                                 "project": _scores(after)},
                "earlier": earlier, "windows": [window],
                "stream_windows": [{"tasks": [0, 2], **_scores(18.0)}], "steps": [],
                "task_seconds": [1.0]}
    return {"seed": seed, "seconds": 1.0, "domains": {
        "a": domain(15.0, {}),
        "b": domain(live_b, {"a": {"live": _scores(later_a), "project": _scores(later_a)}})}}


def test_the_goal_lines_are_reductions_against_base_and_changes_on_earlier_domains() -> None:
    from cli.bench_campaign.report import summarise

    config = CampaignConfig(domains=("a", "b"), seeds=(0, 1), tasks=2, heldout=1,
                            train_every=2)
    seeds = [_fake_seed(0, 10.0, 15.0), _fake_seed(1, 14.0, 16.2)]
    goal = summarise(config, seeds, elapsed_s=1.0, machine="test")["goal"]["live"]
    # reductions: seed 0 (25 % + 50 %) / 2 = 37.5 %, seed 1 (25 % + 30 %) / 2 = 27.5 %
    assert goal["reduction_mean"]["mean"] == pytest.approx(0.325)
    assert goal["reduction"]["a"]["mean"] == pytest.approx(0.25)
    assert goal["reduction_met"] and goal["domains_meeting_reduction"] == 2
    # a after b: seed 0 unchanged, seed 1 16.2 / 15 - 1 = +8 %: the mean +4 % meets +5 %
    assert goal["forgetting"]["a after b"]["values"] == pytest.approx([0.0, 0.08])
    assert goal["forgetting_worst"]["mean"] == pytest.approx(0.04)
    assert goal["forgetting_met"]
    seeds = [_fake_seed(0, 10.0, 16.2), _fake_seed(1, 14.0, 16.2)]  # +8 % in both: missed
    goal = summarise(config, seeds, elapsed_s=1.0, machine="test")["goal"]["live"]
    assert goal["forgetting_worst"]["mean"] == pytest.approx(0.08)
    assert not goal["forgetting_met"]
