# A regcl worker: one Celery process (solo pool) per GPU, on every queue.
#
#   docker build -f docker/worker.Dockerfile -t regcl-worker .
#
# torch==2.14.1's default wheel ships its own CUDA 13 libraries; the CUDA 13 base image adds
# the container toolkit's driver check (the host needs a driver that supports CUDA 13).
FROM nvidia/cuda:13.0.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu 22.04's python3.11 (universe); the project needs 3.11 exactly.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY regcl ./regcl
COPY infra ./infra
COPY service ./service
COPY workers ./workers
COPY cli ./cli
RUN pip install . \
    && useradd --system --uid 10001 --create-home regcl \
    && mkdir -p /var/lib/regcl/data /var/lib/regcl/artifacts \
    && chown -R regcl:regcl /var/lib/regcl

# Same uid and paths as the API image, so both can write the shared artifact volume.
ENV REGCL_DATA_DIR=/var/lib/regcl/data \
    REGCL_ARTIFACT_URL=/var/lib/regcl/artifacts

USER regcl

# SIGTERM = Celery's warm shutdown: a running job stops at its next check and goes back to
# the queue (acks_late), to start again on the next worker. No HEALTHCHECK: a solo worker
# busy with a job answers no control ping until the job ends.
CMD ["celery", "-A", "workers.celery_app", "worker", "--pool", "solo", "--concurrency", "1", "-Q", "regcl.gpu,regcl.merge", "--hostname", "regcl@%h", "--loglevel", "INFO"]
