"""The settings of ``regcl bench serve`` (:class:`ServeBenchConfig`) and the encoder variants
it can time."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["ENCODER_VARIANTS", "ServeBenchConfig"]


@dataclass(frozen=True)
class ServeBenchConfig:
    model: str = "tiny"
    checkpoint: str | None = None
    random_weights: bool = False  # vit_*: random weights instead of a checkpoint
    device: str = "cpu"
    url: str | None = None
    admin_key: str | None = None
    swap_versions: tuple[int, ...] = ()
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 128  # new-image requests per concurrency level
    cached_requests: int = 256
    cached_images: int = 8
    batch_prompts: int = 16  # prompts per request of the batch phase (POST /v1/segment/batch)
    warmup: int = 32
    baseline_requests: int = 64
    overhead_requests: int = 96
    swaps: int = 3
    swap_interval_s: float = 3.0
    train_images: int = 32
    train_epochs: int = 2
    train_batch: int = 8
    encoder_variants: tuple[str, ...] = ("fp32", "fp32-sdpa")
    encoder_batches: tuple[int, ...] = (1, 8)
    encoder_seconds: float = 3.0
    server_env: dict[str, str] = field(default_factory=dict)
    threads: int = 0
    auto_domains: tuple[int, ...] = (5, 16)  # auto rows: images from this many domains
    auto_requests: int = 96  # new-image requests per auto / live row and run
    auto_stats_images: int = 24  # images behind each bench domain adapter's statistics

    @classmethod
    def quick(cls, **overrides: Any) -> ServeBenchConfig:
        """A smoke run (about a minute on 2 CPU cores, tiny model)."""
        base = cls(concurrency=(1, 4), requests=12, cached_requests=24, cached_images=4,
                   warmup=4, baseline_requests=8, overhead_requests=8, swaps=1,
                   swap_interval_s=2.0, train_images=8, train_epochs=1,
                   encoder_variants=("fp32", "fp32-sdpa"), encoder_batches=(1, 2),
                   encoder_seconds=0.3, auto_domains=(2, 3), auto_requests=6,
                   auto_stats_images=4)
        return replace(base, **overrides)


ENCODER_VARIANTS = {  # name: (dtype, sdpa, compile)
    "fp32": ("float32", False, False),
    "fp32-sdpa": ("float32", True, False),
    "bf16": ("bfloat16", False, False),
    "bf16-sdpa": ("bfloat16", True, False),
    "bf16-sdpa-compile": ("bfloat16", True, True),
    "fp32-compile": ("float32", False, True),
}
