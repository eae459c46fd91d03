"""An adapter on disk, stated once: its file names and its statistics' key names (imports
nothing heavy, so ``infra`` and the API use it without torch).

A PEFT adapter directory holds :data:`CONFIG_FILE` and :data:`WEIGHTS_FILE`, optionally
:data:`STATS_FILE` (Gram statistics) and :data:`META_FILE` (regcl's metadata); files with an
:data:`UNSAFE_SUFFIXES` suffix (pickles) are refused. For each linear weight key ``K`` of an
adapter (PEFT naming, e.g. ``base_model.model.image_encoder.blocks.3.attn.qkv.lora_A.weight``)
that has statistics: ``K.gram`` (in x in, the Gram ``XᵀX / n`` of that layer's inputs) and
``K.count`` (0-dim, the token count ``n``) and, in statistics made since the domain router
(:mod:`regcl.routing`), ``K.mean`` (in, the mean input row; older statistics lack it and stay
valid: nothing that merges reads it).
"""

from __future__ import annotations

__all__ = [
    "CONFIG_FILE",
    "COUNT_SUFFIX",
    "GRAM_SUFFIX",
    "MEAN_SUFFIX",
    "META_FILE",
    "STATS_FILE",
    "UNSAFE_SUFFIXES",
    "WEIGHTS_FILE",
    "count_key",
    "gram_key",
    "mean_key",
    "weight_key_of_gram",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
STATS_FILE = "regcl_stats.safetensors"
META_FILE = "regcl_adapter.json"
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

GRAM_SUFFIX = ".gram"
COUNT_SUFFIX = ".count"
MEAN_SUFFIX = ".mean"


def gram_key(weight_key: str) -> str:
    """Stats key of the input Gram (in x in) of ``weight_key``."""
    return weight_key + GRAM_SUFFIX


def count_key(weight_key: str) -> str:
    """Stats key of the token count (0-dim) behind the Gram of ``weight_key``."""
    return weight_key + COUNT_SUFFIX


def mean_key(weight_key: str) -> str:
    """Stats key of the mean input row (in) of ``weight_key`` (optional, see above)."""
    return weight_key + MEAN_SUFFIX


def weight_key_of_gram(stats_key: str) -> str | None:
    """The weight key whose Gram ``stats_key`` is, or None if it is not a Gram key."""
    return stats_key[: -len(GRAM_SUFFIX)] if stats_key.endswith(GRAM_SUFFIX) else None
