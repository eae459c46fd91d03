"""``regcl bench merge`` on the tiny model: complete rows, constant state size, real timings."""

from __future__ import annotations

from regcl.adapters.config import default_blocks
from regcl.bench.merge import merge_markdown, run_merge_benchmark, synthetic_adapter
from regcl.models.build import SAM_SPECS


def test_synthetic_adapter_has_peft_shapes():
    weights, stats = synthetic_adapter("tiny", rank=10)
    spec = SAM_SPECS["tiny"]
    embed = spec.encoder_embed_dim
    blocks = default_blocks(spec.encoder_depth)
    assert len(weights) == 2 * len(blocks)
    for key, value in weights.items():
        assert key.startswith("base_model.model.image_encoder.blocks.")
        if ".lora_A." in key:
            assert tuple(value.shape) == (10, embed)
            assert tuple(stats[key + ".gram"].shape) == (embed, embed)
        else:
            assert tuple(value.shape) == (3 * embed, 10)
            assert tuple(stats[key + ".gram"].shape) == (10, 10)
        assert int(stats[key + ".count"]) > 0


def test_merge_benchmark_tiny():
    report = run_merge_benchmark(models=("tiny",), domains=(1, 3),
                                 methods=("regcl", "regcl_product"))
    rows = report["rows"]
    assert [(r["method"], r["domains"]) for r in rows] == [
        ("regcl", 1), ("regcl", 3), ("regcl_product", 1), ("regcl_product", 3)]
    for row in rows:
        assert row["model"] == "tiny"
        assert row["fold_ms"] > 0 and row["solve_ms"] > 0
        assert row["state_bytes"] > 0 and row["peak_bytes"] > row["state_bytes"]
    for method in ("regcl", "regcl_product"):
        sizes = {r["state_bytes"] for r in rows if r["method"] == method}
        assert len(sizes) == 1  # constant in the number of domains
    assert {"platform", "torch", "threads"} <= set(report["machine"])
    table = merge_markdown(report)
    assert table.count("\n") == 1 + len(rows)
    assert "| tiny | regcl_product | 3 |" in table


def test_cli_prints_the_table(capsys):
    from cli.main import main

    assert main(["bench", "merge", "--models", "tiny", "--methods", "regcl",
                 "--domains", "1,2"]) == 0
    out = capsys.readouterr().out
    assert out.count("| tiny | regcl |") == 2


def test_methods_without_a_state_keep_every_adapter():
    """core_space has no streaming state: what it keeps grows linearly with the domains."""
    report = run_merge_benchmark(models=("tiny",), domains=(1, 2, 4), methods=("core_space",))
    rows = report["rows"]
    assert [r["domains"] for r in rows] == [1, 2, 4]
    assert rows[1]["state_bytes"] == 2 * rows[0]["state_bytes"]
    assert rows[2]["state_bytes"] == 4 * rows[0]["state_bytes"]
    assert all(r["solve_ms"] > 0 and r["fold_ms"] == 0 for r in rows)
