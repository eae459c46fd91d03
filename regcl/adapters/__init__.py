"""LoRA domain adapters: placement config, PEFT attach/save/load, Gram statistics."""

from regcl.adapters.config import AdapterConfig, default_blocks
from regcl.adapters.lora import (
    AdapterFiles,
    adapter_weights,
    attach_lora,
    check_stats,
    check_weights,
    load_adapter,
    load_weights_into,
    read_adapter,
    save_adapter,
    seeded_lora_init,
    unwrap,
)
from regcl.adapters.stats import collect_gram_stats, lora_linears

__all__ = [
    "AdapterConfig",
    "AdapterFiles",
    "adapter_weights",
    "attach_lora",
    "check_stats",
    "check_weights",
    "collect_gram_stats",
    "default_blocks",
    "load_adapter",
    "load_weights_into",
    "lora_linears",
    "read_adapter",
    "save_adapter",
    "seeded_lora_init",
    "unwrap",
]
