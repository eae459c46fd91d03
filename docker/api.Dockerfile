# The regcl HTTP API (FastAPI + uvicorn), serving SAM on the CPU.
#
#   docker build -f docker/api.Dockerfile -t regcl-api .
#
# Settings come from REGCL_* variables (infra/settings.py); see docker-compose.yml. Run one
# process per container (the model, live adapter and embedding cache live in the process);
# scale with replicas, which all follow the same live pointer in Redis.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The CPU build of torch: the API needs no CUDA, and the default wheel's CUDA libraries would
# add gigabytes. Every other pin comes from pyproject.toml.
COPY pyproject.toml README.md ./
COPY regcl ./regcl
COPY infra ./infra
COPY service ./service
COPY workers ./workers
COPY cli ./cli
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
    && useradd --system --uid 10001 --create-home regcl \
    && mkdir -p /var/lib/regcl/data /var/lib/regcl/artifacts \
    && chown -R regcl:regcl /var/lib/regcl

# Local state (caches, scratch) and the artifact store; docker-compose.yml mounts volumes
# here, the artifact store shared with the workers.
ENV REGCL_DATA_DIR=/var/lib/regcl/data \
    REGCL_ARTIFACT_URL=/var/lib/regcl/artifacts

USER regcl
EXPOSE 8000

# Liveness only (the process answers); readiness (/readyz: model loaded, Redis reachable) is
# the orchestrator's check, see docker-compose.yml. The model loads before uvicorn binds.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["uvicorn", "service.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "10"]
