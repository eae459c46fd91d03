"""An image encoder for serving: one plain ViT whose adapter is folded into its weights.

LoRA adds ``ΔW = scaling · B·A`` to a linear's weight. Serving computes the same output with
the adapter folded in, ``W' = W + ΔW``, written **in place** into the encoder's own weight
tensors: switching adapters (a hot swap, or a request for another domain) is then a copy into
tensors of unchanged shape and identity, never a change of modules, so

- the encoder runs with zero LoRA overhead (live adapter or base: the same matmuls), and
- a ``torch.compile``-d encoder keeps its compiled graph across swaps (parameters are graph
  inputs; nothing the guards look at changes). :attr:`ServingEncoder.compiles` counts them.

Batches are padded up to a fixed bucket size when compiled, so a handful of shapes ever
reach the compiler. The encoder may run in bfloat16 (weights and activations; the output is
returned in float32) and with :mod:`regcl.models.fast_attention`'s SDPA attention.

The encoder is a private copy: its base weights of every folded layer are kept (in float32)
to restore or re-fold from, so folding never accumulates rounding.

:meth:`ServingEncoder.prefix` and :meth:`ServingEncoder.suffix` run the encoder split at a
block (:mod:`regcl.models.encoder`), eagerly even when compiled: the domain router reads the
tokens between them, and the tail can then be finished with the adapter the router chose.
Uncompiled, ``suffix(prefix(x, k), k)`` is the same computation as the whole forward.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence

import torch
from segment_anything.modeling import ImageEncoderViT

from regcl.errors import ConfigError
from regcl.models.encoder import encode_prefix, encode_suffix
from regcl.models.fast_attention import use_sdpa_attention

__all__ = ["ServingEncoder", "lora_deltas"]

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8)


def lora_deltas(encoder: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """``ΔW`` of every LoRA layer of a PEFT-wrapped image encoder for adapter ``adapter``,
    by the layer's module name inside the encoder (``blocks.7.attn.qkv``), in float32.

    Uses PEFT's own ``get_delta_weight`` (scaling, fan-in/fan-out, rsLoRA handled there).
    Raises ConfigError for layers whose effect is not a plain weight delta (DoRA).
    """
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, torch.Tensor] = {}
    for name, module in encoder.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter, False):
            raise ConfigError(f"{name}: DoRA adapters cannot be folded into the weights")
        if not isinstance(module.get_base_layer(), torch.nn.Linear):
            raise ConfigError(f"{name}: only LoRA on linear layers can be folded")
        with torch.no_grad():
            deltas[name] = module.get_delta_weight(adapter).detach().float()
    return deltas


class ServingEncoder:
    """A private copy of a SAM image encoder, set up for inference.

    Args:
        encoder: the base encoder to copy (left untouched; any device or dtype).
        device: where to run. dtype: float32 or bfloat16 (weights and activations).
        sdpa: use ``scaled_dot_product_attention`` (:mod:`regcl.models.fast_attention`).
        compile: ``torch.compile`` the forward (batches padded to ``buckets``).
        buckets: batch sizes a compiled encoder is called with (ascending).
    """

    def __init__(self, encoder: ImageEncoderViT, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, sdpa: bool = False,
                 compile: bool = False, buckets: Sequence[int] = DEFAULT_BUCKETS) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"serving dtype must be float32 or bfloat16, got {dtype}")
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ConfigError(f"buckets must be ascending positive sizes, got {buckets}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.sdpa = sdpa
        self.compiled = compile
        self.buckets = tuple(int(b) for b in buckets)
        module = copy.deepcopy(encoder).to(device=self.device, dtype=dtype).eval()
        module.requires_grad_(False)
        if sdpa:
            use_sdpa_attention(module)
        self.module = module
        self.img_size: int = module.img_size
        self._linears = {name: m for name, m in module.named_modules()
                         if isinstance(m, torch.nn.Linear)}
        self._base: dict[str, torch.Tensor] = {}  # float32 base weights of folded layers
        self._folded: frozenset[str] = frozenset()
        self.compiles = 0  # forward graphs compiled so far (0 when not compiled)
        self._forward = torch.compile(module, dynamic=False, backend=self._backend) \
            if compile else module

    def _backend(self, graph: torch.fx.GraphModule, inputs: list) -> object:
        """Inductor, counting each graph it is handed (a recompile after a swap would show)."""
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        logger.info("compiling the image encoder (graph %d)", self.compiles)
        return compile_fx(graph, inputs)

    # ------------------------------------------------------------------------------- folding
    @property
    def folded_layers(self) -> frozenset[str]:
        """Names of the layers that currently hold a folded delta."""
        return self._folded

    def fold(self, deltas: Mapping[str, torch.Tensor] | None) -> None:
        """Set every linear to base + its delta (``None`` or missing: base), in place.

        Each delta must have its layer's weight shape. Layers folded before and not named
        now are restored to their base weights exactly.
        """
        deltas = deltas or {}
        unknown = sorted(set(deltas) - set(self._linears))
        if unknown:
            raise ConfigError(f"no linear layer named {unknown[:3]} in the serving encoder")
        with torch.no_grad():
            for name, delta in deltas.items():
                weight = self._linears[name].weight
                if tuple(delta.shape) != tuple(weight.shape):
                    raise ConfigError(f"{name}: delta {tuple(delta.shape)} does not fit weight "
                                      f"{tuple(weight.shape)}")
                base = self._base.get(name)
                if base is None:
                    base = self._base[name] = weight.detach().float().clone()
                weight.copy_(base + delta.to(device=base.device, dtype=torch.float32))
            for name in self._folded - set(deltas):
                self._linears[name].weight.copy_(self._base[name])
        self._folded = frozenset(deltas)

    def folds_before(self, block: int) -> bool:
        """Whether any layer of blocks ``0..block-1`` holds a folded delta now."""
        return any(name.startswith("blocks.") and int(name.split(".")[1]) < block
                   for name in self._folded)

    # ------------------------------------------------------------------------------- running
    @torch.no_grad()
    def prefix(self, pixels: torch.Tensor, block: int) -> torch.Tensor:
        """Normalised, padded pixels B x 3 x S x S → tokens B x h x w x C entering ``block``
        (in the encoder's dtype), with whatever is folded into the blocks before it."""
        if not 0 <= block <= len(self.module.blocks):
            raise ConfigError(f"block must be in [0, {len(self.module.blocks)}], got {block}")
        return encode_prefix(self.module, pixels.to(device=self.device, dtype=self.dtype), block)

    @torch.no_grad()
    def suffix(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        """Tokens B x h x w x C from :meth:`prefix` → embeddings B x C' x h' x w' (float32)."""
        tokens = tokens.to(device=self.device, dtype=self.dtype)
        return encode_suffix(self.module, tokens, block).float()

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised, padded pixels B x 3 x S x S → embeddings B x C x h x w (float32)."""
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        n = pixels.shape[0]
        if not self.compiled:
            return self._forward(pixels).float()
        out: list[torch.Tensor] = []
        start = 0
        while start < n:  # chunks of at most the largest bucket, each padded up to a bucket
            chunk = pixels[start : start + self.buckets[-1]]
            size = next(b for b in self.buckets if b >= chunk.shape[0])
            if size > chunk.shape[0]:
                pad = chunk.new_zeros((size - chunk.shape[0], *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad])
            result = self._forward(chunk)
            out.append(result[: min(self.buckets[-1], n - start)].float())
            start += self.buckets[-1]
        return torch.cat(out) if len(out) > 1 else out[0]
