"""scripts/gpu_bench.sh on the CPU in its quick mode, with no benchmark models: the wheel and
environment steps, the device checks (scripts/gpu_checks.py on the tiny SAM) and the summary
run and write their files. The full GPU run (vit_b, vit_h, `regcl bench serve` at 16 clients)
needs a GPU; `regcl bench serve --quick` itself is smoke-tested in test_bench_serve.py, and
`REGCL_GPU_BENCH_MODELS=tiny` runs both together (about 4 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_bench_script_quick_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable,
           "REGCL_GPU_BENCH_MODELS": "", "REGCL_GPU_BENCH_DEVICE": "cpu",
           "REGCL_GPU_BENCH_QUICK": "1"}
    result = subprocess.run(["bash", "scripts/gpu_bench.sh"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"env.txt", "log.txt", "checks.json",
                                               "summary.md"}
    checks = json.loads((out / "checks.json").read_text())
    assert checks["failed"] == []
    assert checks["attention_tiny"]["bf16-sdpa"]["within_tolerance"]
    assert checks["engine"]["ok"] and checks["training"]["ok"]
    assert "torch" in (out / "env.txt").read_text()
    assert "checks on cpu" in (out / "summary.md").read_text()
