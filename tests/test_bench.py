"""The continual-learning benchmark end to end, at toy size: seeds, intervals, paired
differences, ``auto``, the sweep, and numbers that do not depend on the worker count."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest

from cli.main import main
from regcl.bench.cl import BenchConfig, config_from_options, domain_orders, run_cl_benchmark
from regcl.bench.cl_output import report_text, write_outputs
from regcl.bench.cl_report import markdown_table, mean_ci, paired, summarise_runs, t_quantile
from regcl.data.domains import LONG_ORDER
from regcl.errors import ConfigError
from regcl.training.adapter import TrainConfig

TOY = BenchConfig(domains=("polyp", "shadow"), orders=2, seeds=(0, 1), train_per_domain=4,
                  test_per_domain=4, train=TrainConfig(epochs=1, batch_size=4),
                  methods=("regcl", "regcl_product", "mean", "ties", "core_space"),
                  sweep=("regcl_product", "regcl_product:ridge=0", "core_space:inner=mean"),
                  route_probes=())


def test_domain_orders_are_distinct_and_deterministic():
    orders = domain_orders(("a", "b", "c", "d"), 4)
    assert orders[0] == ("a", "b", "c", "d") and orders[1] == ("d", "c", "b", "a")
    assert len(set(orders)) == 4 and orders == domain_orders(("a", "b", "c", "d"), 4)


def test_t_quantiles_and_intervals_by_hand():
    # Student-t table: t(0.975, 1) = 12.706, t(0.975, 2) = 4.303, t(0.975, 8) = 2.306
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-3)
    assert t_quantile(0.975, 8) == pytest.approx(2.3060, abs=1e-3)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.9602, abs=1e-3)
    ci = mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1 -> 4.3027 / sqrt(3)
    assert ci["mean"] == 2.0 and ci["ci95"] == pytest.approx(4.3027 / math.sqrt(3), abs=1e-3)
    assert mean_ci([5.0])["ci95"] is None and mean_ci([])["mean"] is None


def test_paired_differences_pair_by_seed_and_order():
    ref = [{"seed": 0, "order": ["a"], "AA": 0.5}, {"seed": 1, "order": ["a"], "AA": 0.7}]
    runs = [{"seed": 0, "order": ["a"], "AA": 0.6}, {"seed": 1, "order": ["a"], "AA": 0.9}]
    out = paired(runs, ref)["AA"]
    assert out["mean"] == pytest.approx(0.15) and out["per_seed"] == {
        "0": pytest.approx(0.1), "1": pytest.approx(0.2)}
    flat = [{"seed": 0, "order": ["b", "a"], "AA": 0.55}]  # no run of that order: seed mean
    assert paired(flat, ref)["AA"]["mean"] == pytest.approx(0.05)


def test_intervals_are_over_seeds_not_runs():
    """Three orders of one seed are not three samples: a merge of all domains scores the same in
    every order, and repeating it must not narrow the interval."""
    one = [{"seed": s, "order": ["a", "b"], "AA": aa} for s, aa in ((0, 0.5), (1, 0.6), (2, 0.8))]
    three = [{**r, "order": order} for r in one for order in (["a", "b"], ["b", "a"], ["a"])]
    single, repeated = summarise_runs(one)["AA"], summarise_runs(three)["AA"]
    assert repeated["mean"] == pytest.approx(single["mean"]) == pytest.approx(1.9 / 3)
    assert repeated["ci95"] == pytest.approx(single["ci95"])  # 4.3027 * sd / sqrt(3)
    assert single["ci95"] == pytest.approx(4.3027 * statistics.stdev([0.5, 0.6, 0.8]) / 3 ** 0.5,
                                           abs=1e-4)
    assert (repeated["n"], repeated["runs"]) == (3, 9)
    # paired: per-run differences, averaged per seed, then the interval over seeds
    ref = [{**r, "AA": 0.5} for r in three]
    runs = [{**r, "AA": r["AA"] + (0.01 if r["order"] == ["a"] else 0.0)} for r in three]
    out = paired(runs, ref)["AA"]
    assert out["n"] == 3 and out["runs"] == 9
    seed_diffs = [aa - 0.5 + 0.01 / 3 for aa in (0.5, 0.6, 0.8)]
    assert out["mean"] == pytest.approx(statistics.fmean(seed_diffs))
    assert out["ci95"] == pytest.approx(mean_ci(seed_diffs)["ci95"])


def test_config_validation_and_options():
    with pytest.raises(ConfigError, match="default merge"):
        BenchConfig(methods=("regcl",), default_method="regcl_product")
    with pytest.raises(ConfigError):
        BenchConfig(methods=("regcl:ridge=-1", "regcl_product"))
    with pytest.raises(ConfigError, match="unknown merge method"):
        BenchConfig(sweep=("nope",))
    config = config_from_options(domains="long", seeds=3, first_seed=10, workers=2,
                                 methods=["regcl", "regcl_product:ridge=1e-06"],
                                 default_method="regcl_product:ridge=1e-06")
    assert config.domains == LONG_ORDER and config.seeds == (10, 11, 12)
    assert config.workers == 2 and config.threads == 1


@pytest.fixture(scope="module")
def report():
    return run_cl_benchmark(TOY)


def test_report_has_every_row_matrix_and_interval(report):
    results = report["results"]
    expected = {"zero-shot base", "individual adapters", "sequential fine-tuning",
                "merge: regcl", "merge: regcl_product", "merge: mean", "merge: ties",
                "merge: core_space", "auto (fallback: regcl_product)"}
    assert set(results) == expected
    for name in expected - {"zero-shot base", "individual adapters"}:
        runs = results[name]["runs"]
        assert sorted((r["seed"], tuple(r["order"])) for r in runs) == [
            (0, ("polyp", "shadow")), (0, ("shadow", "polyp")),
            (1, ("polyp", "shadow")), (1, ("shadow", "polyp"))]
        for r in runs:
            assert len(r["iou"]) == 2 and all(len(row) == 2 for row in r["iou"])
            assert all(0.0 <= v <= 1.0 for row in r["iou"] for v in row)
        aa = [r["AA"] for r in runs]
        assert results[name]["AA"]["mean"] == pytest.approx(statistics.fmean(aa))
        assert results[name]["AA"]["n"] == 2 and results[name]["AA"]["runs"] == 4  # 2 seeds
        assert results[name]["AA"]["ci95"] is not None
    assert results["zero-shot base"]["AA"]["n"] == 2  # one run per seed
    # Paired differences against regcl, recomputed by hand.
    ties = {(r["seed"], tuple(r["order"])): r["AA"] for r in results["merge: ties"]["runs"]}
    regcl = {(r["seed"], tuple(r["order"])): r["AA"] for r in results["merge: regcl"]["runs"]}
    assert results["merge: ties"]["paired_vs_regcl"]["AA"]["mean"] == pytest.approx(
        statistics.fmean(ties[k] - regcl[k] for k in ties))


def test_seeds_draw_different_data_and_adapters(report):
    base = report["results"]["zero-shot base"]["runs"]
    assert base[0]["AA"] != base[1]["AA"]  # other test images, other prompts


def test_one_domain_merge_and_auto_are_that_domains_adapter(report):
    """After the first step every method holds exactly one adapter, and auto routes to it (or
    falls back to the merge of that one adapter): scores equal the individual adapter's."""
    own = {r["seed"]: r["final_per_domain"] for r in
           report["results"]["individual adapters"]["runs"]}
    for name in ("merge: regcl", "merge: mean", "sequential fine-tuning",
                 "auto (fallback: regcl_product)"):
        for r in report["results"][name]["runs"]:
            assert r["iou"][0][0] == pytest.approx(own[r["seed"]][r["order"][0]], abs=1e-5)


def test_sweep_scores_final_merges_and_records_solver_failures(report):
    sweep = report["sweep"]
    # ridge 0: the solve may fail (a singular Gram) for some seeds and not others; a failure is
    # recorded, and exactly the seeds that did not fail are scored
    unridged = sweep["regcl_product:ridge=0"]
    assert set(unridged["failed_seeds"]) <= {0, 1}
    assert sorted(r["seed"] for r in unridged["runs"]) == \
        sorted({0, 1} - set(unridged["failed_seeds"]))
    final = {r["seed"]: r["AA"] for r in report["results"]["merge: regcl_product"]["runs"]}
    for r in sweep["regcl_product"]["runs"]:  # the same merge as the last step of the rows
        assert r["AA"] == pytest.approx(final[r["seed"]], abs=1e-12)
    assert sweep["core_space:inner=mean"]["AA"]["n"] == 2


def test_routing_and_memory_sections(report):
    routing = report["routing"]
    assert 0.0 <= routing["accuracy_all_domains"]["mean"] <= 1.0
    assert routing["auto_by_min_margin"][0]["min_margin"] == 0.0
    memory = report["memory"]
    assert [m["domains"] for m in memory] == [1, 2]
    assert memory[0]["state_bytes regcl"] == memory[1]["state_bytes regcl"]  # flat
    assert memory[1]["auto_adapters_bytes"] == 2 * memory[0]["auto_adapters_bytes"]  # grows
    assert memory[1]["auto_router_bytes"] > memory[0]["auto_router_bytes"]


def test_tables_and_json(report, tmp_path):
    table = markdown_table(report)
    assert table.count("\n") == 1 + len(report["results"])
    assert "| merge: regcl |" in table and "ΔAA vs regcl" in table
    text = write_outputs(report, json_path=str(tmp_path / "r.json"),
                         figure_path=str(tmp_path / "r.png"))
    assert text == report_text(report) and "after t domains" in text
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["results"]["merge: regcl"]["runs"][0]["iou"]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_numbers_do_not_depend_on_the_worker_count(report):
    """Two worker processes (spawned, each with its own model and caches) give the same
    report, bit for bit, as one in-process worker."""
    again = run_cl_benchmark(dataclasses.replace(TOY, workers=2))

    def comparable(r):
        data = {k: v for k, v in r.items() if k not in ("elapsed_s", "machine")}
        data["config"] = {**data["config"], "workers": None}
        return json.dumps(data, sort_keys=True, default=str)

    assert again["config"]["workers"] == 2
    assert comparable(again) == comparable(report)


@pytest.mark.slow
def test_a_cache_of_trained_adapters_changes_no_number(report, tmp_path):
    """A run that fills the cache, and one that reads every training from it, both equal the
    run without a cache."""
    def comparable(r):
        data = {k: v for k, v in r.items()
                if k not in ("elapsed_s", "machine", "trained_from_cache")}
        data["config"] = {**data["config"], "cache_dir": None}
        return json.dumps(data, sort_keys=True, default=str)

    cached = dataclasses.replace(TOY, cache_dir=str(tmp_path / "cache"))
    first = run_cl_benchmark(cached)
    assert first["trained_from_cache"] == 0
    second = run_cl_benchmark(cached)
    assert second["trained_from_cache"] == 2 * 2 + 2 * 2  # 2 seeds x (2 domains + 2 orders)
    assert comparable(first) == comparable(report) == comparable(second)


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "cl", "--domains", "skin", "--orders", "1", "--train-per-domain",
                 "2", "--test-per-domain", "2", "--epochs", "1", "--probes", "polyp",
                 "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["config"]["domains"] == ["skin"] and data["config"]["threads"] == 1
    assert "| merge: regcl |" in capsys.readouterr().out


def test_cli_route_only(tmp_path, capsys):
    out = tmp_path / "route.json"
    assert main(["bench", "cl", "--route-only", "--domains", "polyp,skin", "--probes", "shadow",
                 "--train-per-domain", "4", "--test-per-domain", "4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["count"] == 8 and set(data["novelty_quantiles"]) == {"in-domain", "shadow"}
    assert "routing accuracy" in capsys.readouterr().out


def test_cli_unknown_domain_fails_cleanly(capsys):
    assert main(["bench", "cl", "--domains", "nope", "--orders", "1"]) == 2
