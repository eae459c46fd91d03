"""Where and how LoRA is attached to SAM, and the PEFT ``LoraConfig`` it becomes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from peft import LoraConfig

from regcl.errors import ConfigError

# The paper adapts the last 5 of ViT-B's 12 blocks; other depths keep that fraction.
PAPER_BLOCK_FRACTION = 5 / 12


def default_blocks(depth: int) -> tuple[int, ...]:
    """The last ``ceil(depth * 5/12)`` encoder blocks: 7–11 of vit_b's 12, 3–5 of tiny's 6."""
    count = max(1, math.ceil(depth * PAPER_BLOCK_FRACTION - 1e-9))
    return tuple(range(depth - count, depth))


@dataclass(frozen=True)
class AdapterConfig:
    """A domain adapter's placement and size.

    rank: LoRA rank r (paper: 10). alpha: LoRA alpha; the update is scaled by alpha / r
    (default alpha = r, scale 1). blocks: image-encoder blocks that get LoRA (None: the
    paper's placement scaled to the model's depth). targets: linear modules inside each block.
    """

    rank: int = 10
    alpha: float | None = None
    blocks: tuple[int, ...] | None = None
    targets: tuple[str, ...] = ("qkv",)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("at least one target module is needed")

    def resolved_blocks(self, depth: int) -> tuple[int, ...]:
        blocks = default_blocks(depth) if self.blocks is None else tuple(sorted(self.blocks))
        bad = [b for b in blocks if not 0 <= b < depth]
        if bad or not blocks:
            raise ConfigError(f"blocks {bad or blocks} do not exist in an encoder of depth {depth}")
        return blocks

    def to_peft(self, depth: int) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            target_modules=list(self.targets),
            layers_pattern="blocks",
            layers_to_transform=list(self.resolved_blocks(depth)),
            lora_dropout=self.dropout,
            bias="none",
        )
