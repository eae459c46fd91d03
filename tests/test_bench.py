"""The continual-learning benchmark end to end, at toy size."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from regcl.bench.cl import BenchConfig, domain_orders, markdown_table, run_cl_benchmark
from regcl.training.adapter import TrainConfig

TOY = BenchConfig(domains=("polyp", "shadow"), orders=2, train_per_domain=4, test_per_domain=4,
                  train=TrainConfig(epochs=1, batch_size=4),
                  methods=("regcl", "regcl_product", "mean", "ties"))


def test_domain_orders_are_distinct_and_deterministic():
    orders = domain_orders(("a", "b", "c", "d"), 4)
    assert orders[0] == ("a", "b", "c", "d") and orders[1] == ("d", "c", "b", "a")
    assert len(set(orders)) == 4 and orders == domain_orders(("a", "b", "c", "d"), 4)


@pytest.fixture(scope="module")
def report():
    return run_cl_benchmark(TOY)


def test_report_has_every_method_and_matrix(report):
    results = report["results"]
    expected = {"zero-shot base", "individual adapters", "sequential fine-tuning",
                "merge: regcl", "merge: regcl_product", "merge: mean", "merge: ties"}
    assert set(results) == expected
    for name in expected - {"zero-shot base", "individual adapters"}:
        matrices = results[name]["matrices"]
        assert [m["order"] for m in matrices] == [["polyp", "shadow"], ["shadow", "polyp"]]
        for m in matrices:
            assert len(m["iou"]) == 2 and all(len(r) == 2 for r in m["iou"])
            assert all(0.0 <= v <= 1.0 for r in m["iou"] for v in r)
        assert 0.0 <= results[name]["AA"] <= 1.0


def test_one_domain_merge_is_that_domains_adapter(report):
    """After the first step every method holds exactly one adapter: scores equal the
    individual adapter's on that domain."""
    own = report["results"]["individual adapters"]["per_domain"]
    for name in ("merge: regcl", "merge: mean", "sequential fine-tuning"):
        for m in report["results"][name]["matrices"]:
            first = m["order"][0]
            assert m["iou"][0][0] == pytest.approx(own[first]["iou"], abs=1e-6)


def test_markdown_table_lists_methods(report):
    table = markdown_table(report)
    assert table.count("\n") == 1 + len(report["results"])
    assert "| merge: regcl |" in table and "AA (IoU)" in table


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "cl", "--domains", "skin", "--orders", "1", "--train-per-domain",
                 "2", "--test-per-domain", "2", "--epochs", "1", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["config"]["domains"] == ["skin"]
    assert "| merge: regcl |" in capsys.readouterr().out


def test_cli_unknown_domain_fails_cleanly(capsys):
    assert main(["bench", "cl", "--domains", "nope", "--orders", "1"]) == 2
