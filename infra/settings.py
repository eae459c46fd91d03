"""Settings shared by the service, the workers and ``regcl up``: read from ``REGCL_*`` variables.

Every field below is set by the environment variable ``REGCL_<FIELD>`` (e.g. ``REGCL_REDIS_URL``,
``REGCL_ADMIN_KEYS=key1,key2``). Nothing is read at import time: build :class:`Settings` (or call
:func:`get_settings`) when a process starts, and pass it down (``create_app(settings)``).

Derived defaults: ``redis_url`` follows ``redis_port`` (``redis://127.0.0.1:6390/0``) and
``artifact_url`` is ``<data_dir>/artifacts``; ``data_dir`` and local ``artifact_url`` are made
absolute so that processes started in other directories agree on them.
"""

from __future__ import annotations

import functools
import hmac
from pathlib import Path
from typing import Annotated, Literal, Self

from fsspec.registry import known_implementations
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from regcl.routing.thresholds import DEFAULT_MAX_DIVERGENCE, DEFAULT_MIN_MARGIN

__all__ = ["MIB", "ModelName", "Settings", "get_settings"]

MIB = 1024 * 1024
ModelName = Literal["tiny", "vit_b", "vit_l", "vit_h"]
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class Settings(BaseSettings):
    """Configuration of one regcl deployment (service, workers and embedded Redis agree on it)."""

    model_config = SettingsConfigDict(env_prefix="REGCL_", extra="ignore", frozen=True)

    redis_url: str = Field(
        default="",
        description="Redis for job state, registry index, live pointer and the Celery broker. "
        "Empty → redis://127.0.0.1:<redis_port>/0 (the embedded server).",
    )
    redis_port: int = Field(
        default=6390, ge=1, le=65535, description="Port of the embedded redis-server (regcl up)."
    )
    data_dir: Path = Field(
        default=Path("./var"),
        description="Local state: embedded Redis persistence, caches, default artifact store.",
    )
    artifact_url: str = Field(
        default="",
        description="Artifact store root: a local path or any fsspec URL (s3://bucket/prefix). "
        "Empty → <data_dir>/artifacts. Must be shared by all hosts that run workers/service.",
    )
    model: ModelName = Field(default="tiny", description="SAM architecture to serve and adapt.")
    checkpoint: Path | None = Field(
        default=None, description="SAM checkpoint; required for vit_*, optional for tiny."
    )
    admin_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        default=(),
        description="Secrets accepted on mutating endpoints (comma-separated in the env). "
        "Empty → every mutating endpoint is disabled (the service answers 403).",
    )
    segment_requires_key: bool = Field(
        default=False,
        description="If true, segmentation needs one of admin_keys too (else it is open).",
    )
    embedding_cache_bytes: int = Field(
        default=256 * MIB, ge=0, description="Image-embedding cache budget; 0 disables it."
    )
    max_upload_bytes: int = Field(default=64 * MIB, gt=0, description="Largest accepted upload.")
    max_image_pixels: int = Field(
        default=16_000_000, gt=0, description="Largest accepted image (width x height)."
    )
    job_visibility_timeout_s: int = Field(
        default=6 * 3600,
        ge=60,
        description="Celery/Redis visibility timeout: an unacknowledged job is redelivered after "
        "this long, so it MUST exceed the longest job (acks_late) or jobs run twice.",
    )
    job_lease_s: float = Field(
        default=60.0,
        gt=0,
        description="A worker renews the lease of the job it runs every third of this; a running "
        "job whose lease has lapsed lost its worker and is requeued (or failed) by the reaper.",
    )
    reaper_interval_s: float = Field(
        default=15.0, gt=0, description="How often a worker looks for jobs that lost their worker "
        "or their queue message (one worker at a time does it)."
    )
    queued_grace_s: float = Field(
        default=300.0,
        gt=0,
        description="A job queued this long whose message is in no queue (Redis lost it) is sent "
        "again by the reaper.",
    )
    merge_lock_lease_s: float = Field(
        default=60.0,
        gt=0,
        description="The merge lock expires this long after its holder stopped renewing it (the "
        "merging worker renews it every third of this while it works).",
    )
    store_retry_s: float = Field(
        default=120.0,
        ge=0,
        description="Workers try an artifact-store operation again this long while the store "
        "(S3, MinIO) cannot be reached before their job fails with StoreUnavailable. The API "
        "never waits: it answers 503 store-unavailable with Retry-After at once.",
    )
    api_store_deadline_s: float = Field(
        default=40.0,
        gt=0,
        description="The API's time for one request's artifact-store work: on a store that "
        "answers slowly, a request not done with it by then stops before any commit and is "
        "answered 503 store-unavailable (inside the usual 60 s proxy and client timeouts).",
    )
    api_host: str = Field(default="127.0.0.1", description="Address the HTTP API binds.")
    api_port: int = Field(default=8000, ge=1, le=65535, description="Port of the HTTP API.")
    device: str = Field(
        default="cpu",
        description="Where the API runs SAM: cpu, cuda or cuda:<n> (workers: "
        "REGCL_WORKER_DEVICE).",
    )
    serve_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="Image-encoder precision; auto: bfloat16 on CUDA, "
        "float32 on the CPU.",
    )
    serve_attention: Literal["auto", "sdpa", "original"] = Field(
        default="auto", description="Image-encoder attention: scaled_dot_product_attention or "
        "segment-anything's own (bit-exact SamPredictor parity in float32); auto: sdpa on "
        "CUDA, original on the CPU (sdpa: within 1e-4 of SamPredictor, as fast or faster).",
    )
    serve_compile: bool = Field(
        default=False, description="torch.compile the image encoder (survives hot swaps).",
    )
    encoder_batch_size: int = Field(
        default=8, ge=1, le=256, description="Most images per image-encoder forward.",
    )
    encoder_batch_wait_ms: float | None = Field(
        default=None, ge=0, le=1000,
        description="Longest wait for more images after the first of a batch; unset: 0 on "
        "the CPU, 2 ms on CUDA.",
    )
    max_domain_adapters: int = Field(
        default=64, ge=1, le=4096, description="Domain adapters kept loaded for serving (each "
        "is its LoRA factors: 90 KiB for the tiny SAM's default adapter, 600 KiB for vit_b's; "
        "a batch applies each image's own); a request naming another one unloads the least "
        "recently used one no request is using.",
    )
    route_min_margin: float = Field(
        default=DEFAULT_MIN_MARGIN, ge=0, allow_inf_nan=False, description="adapter auto: "
        "the least lead (nats per token and feature) of the best domain over the runner-up "
        "for its adapter to serve the image; else the live merged adapter serves it.",
    )
    route_max_novelty: float = Field(
        default=DEFAULT_MAX_DIVERGENCE, gt=0, allow_inf_nan=False, description="adapter auto: "
        "the largest novelty under the best domain for its adapter to serve the image (half "
        "the mean squared Mahalanobis distance per feature minus 1, plus twice the log-volume "
        "gap per feature; below 1.3 for most in-domain images, far above for noise, uniform "
        "or unseen-domain images).",
    )
    serve_threads: int | None = Field(
        default=None, ge=0, description="torch intra-op threads of the API process; unset: "
        "from the host (CPU: one core fewer than the process may use, at least 1; CUDA: "
        "torch's default); 0: torch's default.",
    )
    label_studio_url: str = Field(
        default="", description="The Label Studio whose ML backend this service is "
        "(http(s)://host[:port][/base]); task images are fetched from this origin only. "
        "Empty: /labelstudio cannot fetch images.",
    )
    label_studio_api_key: SecretStr = Field(
        default=SecretStr(""), description="Label Studio API token used to fetch task images "
        "(a legacy token, sent as 'Token <key>', or a personal access token, a JWT exchanged "
        "for an access token).",
    )
    label_studio_token_refresh_s: float = Field(
        default=30.0, ge=0, le=3600, description="With a personal access token: refresh the "
        "access token this long before it expires (Label Studio's last 5 minutes).",
    )
    label_studio_storage_hosts: str = Field(
        default="", description="Storage hosts Label Studio may redirect image requests to "
        "(presigned cloud-storage URLs), comma-separated '[scheme://]host[:port]' or "
        "'*.suffix' entries, https unless an entry says http:// (e.g. "
        "'*.s3.amazonaws.com,http://minio.internal:9000'). Empty: no redirect leaves Label "
        "Studio.",
    )
    label_studio_max_image_bytes: int = Field(
        default=32 * MIB, gt=0, description="Largest image fetched from Label Studio.",
    )
    label_studio_fetch_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Longest time one image fetch from Label "
        "Studio may take (connect, redirects and body together).",
    )
    label_studio_webhook_wait_s: float = Field(
        default=0.3, gt=0, le=60, description="How long an annotation webhook that finds nothing "
        "queued waits for its masks to be stored; past it (a large image), it is answered "
        "'queued' and stored all the same. Below Label Studio's WEBHOOK_TIMEOUT (1 s).",
    )
    label_studio_train_every: int = Field(
        default=0, ge=0, description="Start a continual step after this many new annotations "
        "of a project (0: only on Label Studio's Start Training).",
    )
    label_studio_click_memory_bytes: int = Field(
        default=64 * 2**20, ge=0, description="Bytes of low-res logits each API process keeps "
        "so that the next click of a Label Studio session decodes with the previous mask fed "
        "back (0: every click from its points alone).",
    )
    label_studio_serving: Literal["project", "live"] = Field(
        default="project", description="What answers a Label Studio project's predictions: "
        "'project' = its own domain adapter once a continual step found it at least as good as "
        "live on the project's held-out set, else auto (the router), else live; 'live' = the "
        "live merge for every project.",
    )
    label_studio_preencode_max_bytes: int = Field(
        default=1024 * MIB, ge=0, description="Pre-encoding a Label Studio project (on "
        "/labelstudio/setup and POST /labelstudio/preencode) stops once the project's "
        "embeddings in the embedding store take this many bytes (vit_b: 2 MiB per image in "
        "float16); 0: no pre-encoding.",
    )
    embedding_store_dtype: Literal["float16", "float32"] = Field(
        default="float16", description="What pre-encoded embeddings are stored as in the "
        "artifact store (embeddings/...); float16 halves the bytes (its effect on masks: "
        "docs/benchmarks.md, First click).",
    )
    gate_tolerance: float = Field(
        default=0.02, ge=0, le=1, description="Guarded activation: the largest IoU a candidate "
        "may lose on another domain's held-out set and still go live.",
    )

    @field_validator("admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """``"a, b"`` → ``("a", "b")``; blanks dropped, so an empty variable means no keys."""
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            keys = [v.get_secret_value() if isinstance(v, SecretStr) else v for v in value]
            return tuple(k.strip() for k in keys if isinstance(k, str) and k.strip())
        return value

    @field_validator("admin_keys")
    @classmethod
    def _keys_long_enough(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for key in value:
            if len(key.get_secret_value()) < 16:
                raise ValueError("each admin key must be at least 16 characters long")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        kind, _, index = value.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()) \
                or (kind == "cpu" and index):
            raise ValueError(f"device must be cpu, cuda or cuda:<n>, got {value!r}")
        return value

    @field_validator("label_studio_url")
    @classmethod
    def _strip_label_studio_url(cls, value: str) -> str:
        return value.strip()  # checked where it is used: service.labelstudio.origin

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(_REDIS_SCHEMES):
            raise ValueError(f"redis_url must start with one of {_REDIS_SCHEMES}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _derive_and_check(self) -> Self:
        # The model is frozen; derived defaults are filled in through object.__setattr__ once,
        # during validation, before anyone can see the instance.
        if not self.redis_url:
            object.__setattr__(self, "redis_url", f"redis://127.0.0.1:{self.redis_port}/0")
        object.__setattr__(self, "artifact_url", _normalise_artifact_url(
            self.artifact_url.strip() or str(self.data_dir / "artifacts")))
        if self.model != "tiny" and self.checkpoint is None:
            raise ValueError(
                f"model {self.model!r} needs REGCL_CHECKPOINT (segment-anything's official "
                "weights, e.g. sam_vit_b_01ec64.pth); only 'tiny' runs without one"
            )
        if self.segment_requires_key and not self.admin_keys:
            raise ValueError("segment_requires_key is set but admin_keys is empty: "
                             "nobody could segment")
        return self

    @property
    def mutations_enabled(self) -> bool:
        """False when no admin key is configured: mutating endpoints are then disabled."""
        return bool(self.admin_keys)

    @property
    def artifacts_are_local(self) -> bool:
        """True when ``artifact_url`` is a local directory (single-host deployments)."""
        return "://" not in self.artifact_url

    def is_admin_key(self, candidate: str | None) -> bool:
        """Constant-time check of a presented key against ``admin_keys``."""
        if not candidate:
            return False
        given = candidate.encode()
        # Compare with every key (no early exit) so timing does not tell which one matched.
        matches = [hmac.compare_digest(given, k.get_secret_value().encode())
                   for k in self.admin_keys]
        return any(matches)


def _normalise_artifact_url(url: str) -> str:
    """Local paths become absolute; URLs must name a protocol fsspec knows."""
    if url.startswith("file://"):
        url = url.removeprefix("file://")
    if "://" not in url:
        return str(Path(url).expanduser().resolve())
    protocol = url.split("://", 1)[0]
    if protocol not in known_implementations:
        raise ValueError(f"artifact_url: fsspec knows no protocol {protocol!r} ({url!r})")
    return url


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first call (tests may
    ``get_settings.cache_clear()``)."""
    return Settings()
