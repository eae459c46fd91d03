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

Mixed batches (uncompiled): every adapter served is also resident in :attr:`ServingEncoder.bank`
(:mod:`regcl.models.lora_bank`), and a forward given one adapter key per image
(``encoder(pixels, adapters=[...])``) runs the base weights once for the whole batch and adds
each image's own LoRA update in the adapted linears (forward hooks on those linears), computed
as PEFT's unmerged LoRA forward computes it. Nothing is written into the weights, so images of
any mix of adapters share one forward. Numerics against folding: the folded weight
``W + s·BA`` rounds once per weight, the mixed update ``s·(xAᵀ)Bᵀ`` once per output, so the
two differ by float32 rounding (``tests/test_serving_encoder.py`` states the bound); the
mixed path equals PEFT's own LoRA forward. Rows without an adapter are the base model's,
unchanged. A compiled encoder keeps folding (its graph holds no per-row adapter logic).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping, Sequence

import torch
from segment_anything.modeling import ImageEncoderViT

from regcl.errors import ConfigError
from regcl.models.encoder import encode_prefix, encode_suffix
from regcl.models.fast_attention import use_sdpa_attention
from regcl.models.lora_bank import LoraBank, LoraFactors, row_runs

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
        mixed: apply resident adapters per image in one forward (uncompiled only); False:
            adapters can only be folded (the path a compiled encoder always takes).
    """

    def __init__(self, encoder: ImageEncoderViT, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, sdpa: bool = False,
                 compile: bool = False, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 mixed: bool = True) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"serving dtype must be float32 or bfloat16, got {dtype}")
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ConfigError(f"buckets must be ascending positive sizes, got {buckets}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.sdpa = sdpa
        self.compiled = compile
        self._mixed = bool(mixed) and not compile
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
        self.bank = LoraBank(self._linears, dtype=dtype, device=self.device)
        self._runs = None  # the RowRuns of the mixed forward running now (None: none)
        self._hooked: set[str] = set()
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

    # ------------------------------------------------------------------------ resident adapters
    @property
    def mixes(self) -> bool:
        """Whether forwards can mix adapters per image (uncompiled, ``mixed``)."""
        return self._mixed

    def add_adapter(self, key: str, factors: Mapping[str, LoraFactors]) -> None:
        """Make adapter ``key`` resident for mixed forwards (and folding from
        :meth:`delta_weights`). ConfigError when it does not fit. Not while a forward runs."""
        self.bank.add(key, factors)
        if self.mixes:
            for name in factors:
                if name not in self._hooked:
                    self._linears[name].register_forward_hook(self._hook(name))
                    self._hooked.add(name)

    def remove_adapter(self, key: str) -> None:
        """Forget adapter ``key`` (a missing one is ignored). Not while a forward runs."""
        self.bank.remove(key)

    def delta_weights(self, key: str) -> dict[str, torch.Tensor]:
        """``ΔW`` of resident adapter ``key`` per layer, for :meth:`fold`."""
        return self.bank.delta_weights(key)

    def _hook(self, name: str):
        def add_lora(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            runs = self._runs
            if runs is not None:
                self.bank.apply(name, args[0], output, runs)
        return add_lora

    @contextlib.contextmanager
    def _adapters(self, adapters: Sequence[str | None] | None, images: int) -> Iterator[None]:
        """Per-image adapters for the forward inside the block (None or all None: base)."""
        if adapters is None or all(key is None for key in adapters):
            yield
            return
        if not self.mixes:
            raise ConfigError("this serving encoder folds adapters; it cannot mix them")
        if len(adapters) != images:
            raise ConfigError(f"{len(adapters)} adapters for {images} images")
        if self._folded:
            raise ConfigError("an adapter is folded into the weights; fold(None) before mixing")
        runs = row_runs([None if key is None else self.bank.slot(key) for key in adapters])
        self._runs = runs
        try:
            yield
        finally:
            self._runs = None

    # ------------------------------------------------------------------------------- running
    @torch.no_grad()
    def prefix(self, pixels: torch.Tensor, block: int) -> torch.Tensor:
        """Normalised, padded pixels B x 3 x S x S → tokens B x h x w x C entering ``block``
        (in the encoder's dtype), with whatever is folded into the blocks before it."""
        if not 0 <= block <= len(self.module.blocks):
            raise ConfigError(f"block must be in [0, {len(self.module.blocks)}], got {block}")
        return encode_prefix(self.module, pixels.to(device=self.device, dtype=self.dtype), block)

    @torch.no_grad()
    def suffix(self, tokens: torch.Tensor, block: int,
               adapters: Sequence[str | None] | None = None) -> torch.Tensor:
        """Tokens B x h x w x C from :meth:`prefix` → embeddings B x C' x h' x w' (float32).
        adapters: one resident adapter key (or None) per image, for a mixed forward."""
        tokens = tokens.to(device=self.device, dtype=self.dtype)
        with self._adapters(adapters, tokens.shape[0]):
            return encode_suffix(self.module, tokens, block).float()

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor,
                 adapters: Sequence[str | None] | None = None) -> torch.Tensor:
        """Normalised, padded pixels B x 3 x S x S → embeddings B x C x h x w (float32).
        adapters: one resident adapter key (or None: base) per image, for a mixed forward
        (uncompiled encoders only)."""
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        n = pixels.shape[0]
        if not self.compiled:
            with self._adapters(adapters, n):
                return self._forward(pixels).float()
        if adapters is not None and any(key is not None for key in adapters):
            raise ConfigError("a compiled serving encoder folds adapters; it cannot mix them")
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
