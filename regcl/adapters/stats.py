"""Gram statistics of the inputs of every LoRA linear layer, the only thing RegCL keeps of a
domain's data.

For a LoRA layer ``y = W0 x + B A x`` the statistics are, per weight key K (PEFT naming):
``K.gram`` = XᵀX / n over all n tokens seen (in x in; X the inputs of that linear: x for
``lora_A``, A x for ``lora_B``), ``K.count`` = n and ``K.mean`` = the mean input row (in)
(key names: :mod:`regcl.adapters.layout`). ``K.mean`` was added later (the domain router uses
it, :mod:`regcl.routing`); statistics without it stay valid, and nothing that merges reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from peft import PeftModel

from regcl.adapters.layout import count_key, gram_key, mean_key
from regcl.errors import StatsError


def lora_linears(model: PeftModel, adapter_name: str = "default"
                 ) -> dict[str, torch.nn.Linear]:
    """The LoRA A and B linears of one adapter, keyed by their weight's state-dict key
    (``base_model.model.image_encoder.blocks.3.attn.qkv.lora_A.weight``)."""
    found: dict[str, torch.nn.Linear] = {}
    for name, module in model.named_modules():
        for part in ("lora_A", "lora_B"):
            if name.endswith(f".{part}.{adapter_name}") and isinstance(module, torch.nn.Linear):
                found[name[: -len(adapter_name) - 1] + ".weight"] = module
    if not found:
        raise StatsError(f"model has no LoRA layers for adapter {adapter_name!r}")
    return found


@torch.no_grad()
def collect_gram_stats(model: PeftModel, run_batches: Callable[[], Iterable[None]] | None = None,
                       images: torch.Tensor | None = None, batch_size: int = 16
                       ) -> dict[str, torch.Tensor]:
    """Accumulate the Gram of every LoRA linear's input while the model sees a domain's data.

    Either pass ``images`` (N x 3 x S x S float in [0, 255]; the image encoder is run on them
    in batches), or ``run_batches``: a callable that runs the forward passes itself (e.g. on
    cached encoder prefixes) and yields once per batch.
    Returns the statistics dict (``K.gram`` float32 in x in, ``K.count`` int64 scalar,
    ``K.mean`` float32 in).
    """
    from regcl.models.decoding import preprocess

    linears = lora_linears(model)
    sums = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
            for k, m in linears.items()}
    firsts = {k: torch.zeros(m.in_features, dtype=torch.float64) for k, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook_for(key: str):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            if sums[key].device != x.device:  # accumulate where the model runs (e.g. CUDA)
                sums[key] = sums[key].to(x.device)
                firsts[key] = firsts[key].to(x.device)
            sums[key] += x.T @ x
            firsts[key] += x.sum(0)
            counts[key] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(k)) for k, m in linears.items()]
    was_training = model.training
    model.eval()
    try:
        if run_batches is not None:
            for _ in run_batches():
                pass
        elif images is not None:
            sam = model.base_model.model
            for i in range(0, images.shape[0], batch_size):
                sam.image_encoder(preprocess(sam, images[i : i + batch_size]))
        else:
            raise StatsError("collect_gram_stats needs images or run_batches")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stats: dict[str, torch.Tensor] = {}
    for key, total in sums.items():
        if counts[key] == 0:
            raise StatsError(f"no inputs reached {key}: nothing to compute its Gram from")
        stats[gram_key(key)] = (total / counts[key]).to(device="cpu", dtype=torch.float32)
        stats[count_key(key)] = torch.tensor(counts[key], dtype=torch.int64)
        stats[mean_key(key)] = (firsts[key] / counts[key]).to(device="cpu", dtype=torch.float32)
    return stats
