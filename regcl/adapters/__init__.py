"""LoRA domain adapters: placement config, PEFT attach/save/load, Gram statistics and their
key names (:mod:`regcl.adapters.layout`). The names below are imported from their submodule on
first use, so ``regcl.adapters.layout`` can be imported without torch or PEFT."""

from regcl._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("AdapterConfig", "default_blocks"), "config"),
    **dict.fromkeys(("AdapterFiles", "adapter_weights", "attach_lora", "check_stats",
                     "check_weights", "load_adapter", "load_weights_into", "read_adapter",
                     "save_adapter", "seeded_lora_init", "unwrap"), "lora"),
    **dict.fromkeys(("collect_gram_stats", "lora_linears"), "stats"),
    **dict.fromkeys(("count_key", "gram_key", "mean_key"), "layout"),
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
