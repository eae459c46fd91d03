"""Test data for ``adapter: "auto"``: statistics-only domain adapters of the shipped tiny SAM.

Each adapter has seeded random (non-zero) LoRA weights, so it changes the masks, and real
Gram statistics collected on a few training images of one synthetic domain
(:mod:`regcl.data.domains`), so the router can tell its domain. Nothing is trained.
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path

import numpy as np
import torch

from regcl.adapters import AdapterConfig, attach_lora, collect_gram_stats, save_adapter
from regcl.data.domains import domain_split
from regcl.models import build_sam

STATS_IMAGES = 6
SIZE = 256


@functools.cache
def _domain_images(domain: str, split: str, count: int) -> torch.Tensor:
    images, _ = domain_split(domain, split, count, SIZE)
    return images


def domain_image(domain: str, index: int = 0) -> np.ndarray:
    """Test image ``index`` of ``domain`` (H x W x 3 uint8; never used for statistics)."""
    image = _domain_images(domain, "test", index + 1)[index]
    return image.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy().copy()


def nowhere(height: int = SIZE, width: int = SIZE) -> np.ndarray:
    """An image of no domain: uniform RGB noise (H x W x 3 uint8). (A uniform mid-grey square
    is not one: its tokens are all alike and sit close to camo_pattern's mean, novelty 1.1.)"""
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def stats_adapter(directory: Path, domain: str, *, rank: int = 4, scale: float = 0.15) -> Path:
    """A tiny-SAM LoRA adapter for ``domain`` in ``directory`` (see the module docstring;
    its weights are seeded by the domain's name). Tests get them through the session fixture
    ``domain_adapter`` (tests/conftest.py), which makes each once."""
    seed = zlib.crc32(domain.encode())
    torch.manual_seed(seed)
    model = attach_lora(build_sam("tiny"), AdapterConfig(rank=rank))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    stats = collect_gram_stats(model, images=_domain_images(domain, "train", STATS_IMAGES))
    return save_adapter(model, directory, stats=stats, metadata={"domain": domain})
