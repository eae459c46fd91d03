"""How the serving engine runs: device, precision, attention, compile and batching."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from regcl.errors import ConfigError

__all__ = ["ServingOptions", "encoder_buckets"]


@dataclass(frozen=True)
class ServingOptions:
    """How the engine runs its encoder (see :class:`~regcl.models.serving.ServingEncoder`).

    device: ``cpu``, ``cuda``, ``cuda:1``... dtype: None picks bfloat16 on CUDA, float32 on
    the CPU. sdpa: None picks SDPA attention on CUDA and segment-anything's own on the CPU
    (with float32: bit-exact SamPredictor parity, which the API tests hold the service to).
    On the CPU ``sdpa=True`` (``REGCL_SERVE_ATTENTION=sdpa``) was as fast or faster for the
    tiny encoder in our runs, with masks within 1e-4 of SamPredictor's.
    max_decode_batch: most prompts in one mask-decoder call.
    compile: ``torch.compile`` the encoder. max_batch / max_wait_ms: dynamic batching of
    encodes; max_wait_ms None picks 0 on the CPU (the encoder is the bottleneck: requests
    queue up while a batch runs, so batches form without waiting) and 2 ms on CUDA. threads:
    torch intra-op threads (0: leave torch's default; 1 suits a small CPU, where the batcher
    thread and the request threads already run in parallel).
    mixed: one encoder forward per batch whatever its images' adapters (each image's LoRA
    update applied per row); False: fold one adapter at a time into the weights and run one
    forward per adapter in the batch (what a compiled encoder always does).
    """

    device: str = "cpu"
    dtype: torch.dtype | None = None
    sdpa: bool | None = None
    compile: bool = False
    max_batch: int = 8
    max_wait_ms: float | None = None
    threads: int = 0
    max_decode_batch: int = 32
    mixed: bool = True

    def resolved(self) -> ServingOptions:
        """Options with the automatic choices made (a device that exists is required)."""
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"invalid device {self.device!r}: {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")
        gpu = device.type == "cuda"
        wait = (2.0 if gpu else 0.0) if self.max_wait_ms is None else self.max_wait_ms
        if self.max_batch < 1 or wait < 0 or self.threads < 0 or self.max_decode_batch < 1:
            raise ConfigError("need max_batch >= 1, max_wait_ms >= 0, threads >= 0 and "
                              "max_decode_batch >= 1")
        dtype = self.dtype or (torch.bfloat16 if gpu else torch.float32)
        sdpa = gpu if self.sdpa is None else self.sdpa
        return ServingOptions(str(device), dtype, sdpa, self.compile, self.max_batch, wait,
                              self.threads, self.max_decode_batch, self.mixed)


def encoder_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes a compiled encoder is called with: powers of two up to ``max_batch``, and
    ``max_batch`` itself."""
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))
