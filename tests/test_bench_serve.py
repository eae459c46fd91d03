"""``regcl bench serve --quick`` end to end (the real stack: redis-server, the API process, a
spawned load process), and the load generator's summary. Checks that it runs and reports
every section, never how fast anything is."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cli.bench_serve.load import bench_image, summarise

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
        [sys.executable, "-m", "cli", "bench", "serve", "--quick", "--json", str(out),
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
    batch = service["batch"]
    assert batch["failed"] == 0 and batch["ok"] == batch["requests"] > 0
    assert batch["prompts_per_s"] > 0 and batch["prompts_per_request"] == 16
    assert "points per request (POST /v1/segment/batch)" in result.stdout
    swap = service["hot_swap"]
    assert swap["failed"] == 0 and all(s["latency_ms"] is not None for s in swap["swaps"])
    assert swap["server"]["swap_seconds_mean_ms"] is not None
    assert service["lora_overhead"]["live_req_s"] > 0
    auto = service["auto"]  # the quick run: images from 2 and from 3 domains, 3 registered
    assert auto["registered"] == 3 and auto["domains"] == [2, 3]
    assert [(r["workload"], r["concurrency"]) for r in auto["rows"]] == [
        (w, c) for c in (1, 2) for w in ("live", "auto-2", "auto-3")]
    for row in auto["rows"]:
        assert row["failed"] == 0 and row["throughput"] > 0 and len(row["runs"]) == 2
        assert (row["routed"] is None) == (row["workload"] == "live")
    assert "| auto-3 | 2 |" in result.stdout
    assert report["lora_encoder"]["folded_vs_base"] > 0
    assert report["lora_encoder"]["mixed_each_vs_base"] > 0
    assert report["training"]["img_per_s"] > 0
    assert {row["variant"] for row in report["encoder"]} == {"fp32", "fp32-sdpa"}
    assert report["machine"]["torch"] and report["server_env"]["REGCL_SERVE_THREADS"] == "1"


def test_bench_serve_stops_its_stack_when_terminated(tmp_path):
    """SIGTERM mid-run: the command exits and its API process and redis-server go with it."""
    log = tmp_path / "bench.log"
    with log.open("w") as sink:
        bench = subprocess.Popen(
            [sys.executable, "-m", "cli", "bench", "serve", "--quick",
             "--encoder-variants", "", "--threads", "1", "--server-threads", "1"],
            cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        api_pid = None
        while api_pid is None and time.monotonic() < deadline and bench.poll() is None:
            time.sleep(0.5)
            found = re.search(r"API pid (\d+)", log.read_text())
            api_pid = int(found.group(1)) if found else None
        assert api_pid is not None, log.read_text()[-3000:]
        redis_port = int(re.search(r"redis-server on 127\.0\.0\.1:(\d+)", log.read_text())[1])
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=120) != 0
    finally:
        if bench.poll() is None:
            bench.kill()
    for _ in range(100):  # the API process is gone (not even a zombie of ours: not our child)
        try:
            os.kill(api_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"API process {api_pid} outlived the benchmark")
    with socket.socket() as probe:  # and nothing answers on its redis-server's port
        assert probe.connect_ex(("127.0.0.1", redis_port)) != 0
