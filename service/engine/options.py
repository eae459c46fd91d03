"""How the serving engine runs: device, precision, attention, compile, batching and threads.

Unset options are chosen from the host (:meth:`ServingOptions.resolved`): the fastest
setting measured for that kind of host (docs/benchmarks.md, "Defaults from the host").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from regcl.errors import ConfigError

__all__ = ["ServingOptions", "encoder_buckets", "host_cores", "host_threads"]


def host_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def host_threads(device: str, cores: int | None = None) -> int:
    """Torch intra-op threads for an API process on ``device`` (0: torch's default).

    CPU: one core fewer than the host has (at least one). The encoder's and the decoder's
    batcher threads, the event loop and the request threads need a core besides torch's
    pool: on 2 cores one torch thread was the fastest setting measured for every workload
    (new image 1.13-1.15x at 16 clients against 0.92-0.94x with two; a cached prompt's p50
    10.9-11.5 ms against 15.9-17.4 ms; docs/benchmarks.md). CUDA: torch's default (the
    device does the work).
    """
    if torch.device(device).type == "cuda":
        return 0
    return max(1, (host_cores() if cores is None else cores) - 1)


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
    torch intra-op threads (None: from the host, :func:`host_threads`; 0: leave torch's
    default).
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
    threads: int | None = None
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
        threads = host_threads(str(device)) if self.threads is None else self.threads
        if self.max_batch < 1 or wait < 0 or threads < 0 or self.max_decode_batch < 1:
            raise ConfigError("need max_batch >= 1, max_wait_ms >= 0, threads >= 0 and "
                              "max_decode_batch >= 1")
        dtype = self.dtype or (torch.bfloat16 if gpu else torch.float32)
        sdpa = gpu if self.sdpa is None else self.sdpa
        return ServingOptions(str(device), dtype, sdpa, self.compile, self.max_batch, wait,
                              threads, self.max_decode_batch, self.mixed)


def encoder_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes a compiled encoder is called with: powers of two up to ``max_batch``, and
    ``max_batch`` itself."""
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))
