"""``regcl bench serve --quick`` end to end (the real stack: redis-server, the API process, a
spawned load process), and the load generator's summary. Checks that it runs and reports
every section, never how fast anything is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from regcl.bench.serve_load import bench_image, summarise

REPO = Path(__file__).resolve().parent.parent


def test_summary_percentiles_and_failures():
    records = [(0.0, 0.010 * (i + 1), 200, "base") for i in range(100)]
    records.append((0.0, 5.0, 500, ""))
    out = summarise(records)
    assert out["requests"] == 101 and out["ok"] == 100 and out["failed"] == 1
    assert out["p50_ms"] == 505.0 and out["p99_ms"] == 990.1  # failures not in the latency
    assert out["throughput"] == 20.0  # ok requests over the phase's wall time (5 s)
    assert summarise([])["requests"] == 0


def test_bench_images_are_unique_and_repeatable():
    a, b = bench_image(1, 64), bench_image(2, 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, bench_image(1, 64))


def test_bench_serve_quick_smoke(tmp_path):
    out = tmp_path / "serve.json"
    result = subprocess.run(
        [sys.executable, "-m", "regcl.cli", "bench", "serve", "--quick", "--json", str(out),
         "--concurrency", "1,2", "--encoder-variants", "fp32,fp32-sdpa",
         "--encoder-batches", "1", "--threads", "1", "--server-threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "| new image + 1 point: service over HTTP | 2 |" in result.stdout
    service = report["service"]
    for kind in ("new", "cached"):
        assert [row["concurrency"] for row in service[kind]] == [1, 2]
        for row in service[kind]:
            assert row["failed"] == 0 and row["ok"] == row["requests"] > 0
            assert row["vs_baseline"] > 0 and row["p50_ms"] <= row["p99_ms"]
        assert report["baseline"][kind]["throughput"] > 0
    swap = service["hot_swap"]
    assert swap["failed"] == 0 and all(s["latency_ms"] is not None for s in swap["swaps"])
    assert swap["server"]["swap_seconds_mean_ms"] is not None
    assert service["lora_overhead"]["live_req_s"] > 0
    assert report["lora_encoder"]["folded_vs_base"] > 0
    assert report["training"]["img_per_s"] > 0
    assert {row["variant"] for row in report["encoder"]} == {"fp32", "fp32-sdpa"}
    assert report["machine"]["torch"] and report["server_env"]["REGCL_SERVE_THREADS"] == "1"
