"""``regcl bench interactive`` on a tiny configuration: every row, mode and figure, the arms
paired, auto made of its adapters' and the merge's curves, the tables and the command line."""

from __future__ import annotations

import copy
import json

import pytest

from cli.main import main
from regcl.bench.cl_config import BenchConfig
from regcl.bench.interactive import (
    InteractiveBenchConfig,
    _auto_curves,
    combine_reports,
    interactive_tables,
    run_interactive_benchmark,
)
from regcl.data import synthetic
from regcl.errors import ConfigError
from regcl.training.adapter import TrainConfig

TINY = BenchConfig(domains=("polyp",), seeds=(0, 1), train_per_domain=4,
                   test_per_domain=3, train=TrainConfig(epochs=1, batch_size=4))


@pytest.fixture(scope="module")
def report():
    # Scenes come in chunks of 64 (every domain split draws a whole chunk); 4 keep this fast.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synthetic, "CHUNK", 4)
        return run_interactive_benchmark(InteractiveBenchConfig(TINY, arms=(0, 1),
                                                                max_clicks=10))


def test_every_row_mode_and_figure(report):
    results = report["results"]
    assert list(results) == [
        "base", "adapter (own domain) [recipe]", "merge: regcl_product [recipe]",
        "auto [recipe]", "adapter (own domain) [interactive:1]",
        "merge: regcl_product [interactive:1]", "auto [interactive:1]"]
    for name, row in results.items():
        for mode in ("feedback", "points"):
            mean = row[mode]["mean"]
            assert set(mean) == {"iou@1", "iou@3", "iou@5", "iou@10", "noc@80", "noc@85",
                                 "noc@90", "plain"}
            assert mean["iou@1"]["n"] == 2 and mean["iou@1"]["ci95"] is not None  # 2 seeds
            assert all(1 <= mean[f"noc@{k}"]["mean"] <= 10 for k in (80, 85, 90))
            domains = set(row[mode]["per_domain"])
            assert domains == ({"polyp", "source"} if name == "base" else {"polyp"})
        # Click 1 has no mask to feed back: both modes agree on it.
        assert row["feedback"]["mean"]["iou@1"] == row["points"]["mean"]["iou@1"]
    assert set(report["paired"]) == {"adapter (own domain) [interactive:1]",
                                     "merge: regcl_product [interactive:1]",
                                     "auto [interactive:1]"}
    pair = report["paired"]["merge: regcl_product [interactive:1]"]["feedback noc@85"]
    ours = results["merge: regcl_product [interactive:1]"]["feedback"]["per_seed"]
    ref = results["merge: regcl_product [recipe]"]["feedback"]["per_seed"]
    assert pair["per_seed"] == pytest.approx([ours[s]["mean"]["noc@85"]
                                              - ref[s]["mean"]["noc@85"] for s in ("0", "1")])


def test_auto_takes_each_images_curve_from_its_route():
    import torch

    def curves(value: float, n: int) -> dict:
        return {"feedback": torch.full((n, 2), value), "plain": torch.full((n,), value)}

    plan = {"a": ["a", None, "b"], "b": ["b", "a"]}
    own = {"a": curves(1.0, 3), "b": curves(2.0, 2)}
    merge = {"a": curves(0.0, 3), "b": curves(0.0, 2)}
    elsewhere = {(0, "b"): {"a": curves(5.0, 1)}, (0, "a"): {"b": curves(7.0, 1)}}
    auto = _auto_curves(plan, ("a", "b"), own, merge, elsewhere, 0)
    assert auto["a"]["plain"].tolist() == [1.0, 0.0, 5.0]
    assert auto["b"]["feedback"][:, 0].tolist() == [2.0, 7.0]


def test_tables_and_validation(report):
    text = interactive_tables(report)
    assert "| model | mask feedback | IoU@1 |" in text
    assert "| base on the source domain |" in text and "| paired: arm − recipe |" in text
    lines = text.splitlines()
    # Both modes in the main table, one row in the NoC@85 one, one pair against the recipe.
    assert sum(line.startswith("| auto [recipe] |") for line in lines) == 3
    assert sum(line.startswith("| auto [interactive:1] |") for line in lines) == 4
    with pytest.raises(ConfigError):
        InteractiveBenchConfig(TINY, arms=(0, 0))
    with pytest.raises(ConfigError):
        InteractiveBenchConfig(TINY, max_clicks=5)


def test_cli_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK", 4)
    out = tmp_path / "report.json"
    code = main(["bench", "interactive", "--domains", "polyp", "--seeds", "1", "--arms", "",
                 "--train-per-domain", "2", "--test-per-domain", "2", "--epochs", "1",
                 "--max-clicks", "10", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["config"]["arms"] == [] and data["config"]["seeds"] == [0]  # the base alone
    assert list(data["results"]) == ["base"] and data["paired"] == {}
    assert data["config"]["max_clicks"] == 10
    assert "| base |" in capsys.readouterr().out


def _seeds_of(report, seeds):
    """``report`` as if it had run ``seeds`` only (its per-seed figures of those)."""
    part = copy.deepcopy(report)
    part["config"]["seeds"] = seeds
    for row in part["results"].values():
        for mode in row.values():
            mode["per_seed"] = {s: f for s, f in mode["per_seed"].items() if int(s) in seeds}
    return part


def test_reports_of_disjoint_seeds_combine_into_the_report_of_all(report, tmp_path, capsys):
    """Runs split over seeds (to fit a machine's time) pool into what one run would report:
    the same summaries, intervals and pairs, whatever the order of the parts."""
    combined = combine_reports([_seeds_of(report, [1]), _seeds_of(report, [0])])
    assert combined["results"] == report["results"]
    assert combined["paired"] == report["paired"]
    assert json.dumps(combined["config"]) == json.dumps(report["config"])  # seeds: 0, 1
    assert [run["seeds"] for run in combined["runs"]] == [[1], [0]]
    with pytest.raises(ConfigError, match="repeats seeds"):
        combine_reports([_seeds_of(report, [0]), report])
    other = _seeds_of(report, [1])
    other["config"]["max_clicks"] = 20
    with pytest.raises(ConfigError, match="settings"):
        combine_reports([_seeds_of(report, [0]), other])
    parts = []
    for seeds in ([0], [1]):
        parts.append(tmp_path / f"part{seeds[0]}.json")
        parts[-1].write_text(json.dumps(_seeds_of(report, seeds)))
    out = tmp_path / "all.json"
    assert main(["bench", "interactive", "--combine", *map(str, parts), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["paired"] == report["paired"]
    assert "| paired: arm − recipe |" in capsys.readouterr().out
