"""Many LoRA adapters resident at once, each row of a batch with its own (S-LoRA / Punica).

A LoRA linear computes ``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` (A: r x in, B: out x r, s the
scaling). With many adapters resident, a batch whose rows use different adapters still runs
the base matmul ``x Wᵀ + b`` **once** for the whole batch; then each run of rows that share an
adapter adds that adapter's low-rank update, computed exactly as PEFT's unmerged LoRA forward
computes it (``lora_B(lora_A(x)) * scaling``): two skinny matmuls per adapter present, no
weight is written, so no lock is needed around the choice of adapter.

:class:`LoraBank` keeps the factors of every resident adapter, per adapted layer, stacked in one
tensor each (``A``: S x r_max x in, ``B``: S x out x r_max; S slots, grown by doubling, rows of
free slots zero), with each slot's own rank, so a row's update uses exactly its adapter's r
columns. :meth:`LoraBank.apply` adds the updates to a layer's output for row runs given in
image units (:class:`RowRuns`): a windowed encoder block sees ``images x windows`` rows, and
the windows of one image are consecutive, so a run of images is a run of rows.

The bank is the pure part (tensors and arithmetic); :class:`~regcl.models.serving.ServingEncoder`
installs it on its linears.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from regcl.errors import ConfigError

__all__ = ["LoraBank", "LoraFactors", "RowRuns", "lora_factors", "row_runs", "slots_of"]

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


@dataclass(frozen=True)
class LoraFactors:
    """One adapted linear's LoRA factors: ``a`` r x in, ``b`` out x r, and ``scaling``."""

    a: Tensor
    b: Tensor
    scaling: float

    def delta(self) -> Tensor:
        """``ΔW = scaling · B A`` (out x in, float32), as PEFT's ``get_delta_weight``."""
        return (self.b.float() @ self.a.float()) * self.scaling


def lora_factors(encoder: torch.nn.Module, adapter: str) -> dict[str, LoraFactors]:
    """The LoRA factors of adapter ``adapter`` in every LoRA layer of a PEFT-wrapped image
    encoder, by the layer's module name inside the encoder (``blocks.7.attn.qkv``); detached
    float32 copies. Raises ConfigError for layers that are not plain LoRA on a linear (DoRA,
    convolutions), whose effect is not a low-rank update of a linear's output."""
    from peft.tuners.lora import LoraLayer

    found: dict[str, LoraFactors] = {}
    for name, module in encoder.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter, False):
            raise ConfigError(f"{name}: DoRA adapters cannot be served as low-rank updates")
        if not isinstance(module.get_base_layer(), torch.nn.Linear) or getattr(
                module, "fan_in_fan_out", False):
            raise ConfigError(f"{name}: only LoRA on linear layers can be served")
        a, b = module.lora_A[adapter], module.lora_B[adapter]
        if not isinstance(a, torch.nn.Linear) or not isinstance(b, torch.nn.Linear) or (
                a.bias is not None or b.bias is not None):
            raise ConfigError(f"{name}: only bias-free LoRA factors can be served")
        found[name] = LoraFactors(a.weight.detach().float().clone(),
                                  b.weight.detach().float().clone(),
                                  float(module.scaling[adapter]))
    return found


@dataclass(frozen=True)
class RowRuns:
    """Which adapter each run of consecutive images of a batch uses.

    images: the batch size B. runs: ``(start, stop, slot)`` in images, slot a bank index or
    None (no adapter: the base rows).
    """

    images: int
    runs: tuple[tuple[int, int, int | None], ...]


def row_runs(slots: Sequence[int | None]) -> RowRuns:
    """The runs of equal slots in ``slots`` (one per image, in batch order)."""
    runs: list[tuple[int, int, int | None]] = []
    for index, slot in enumerate(slots):
        if runs and runs[-1][2] == slot:
            runs[-1] = (runs[-1][0], index + 1, slot)
        else:
            runs.append((index, index + 1, slot))
    return RowRuns(len(slots), tuple(runs))


class _Layer:
    """One adapted linear's stacks: ``a`` S x r_max x in, ``b`` S x out x r_max, ranks S."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.a = torch.zeros(0, 0, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(0, out_features, 0, dtype=dtype, device=device)
        self.ranks: list[int] = []
        self.scalings: list[float] = []

    def ensure(self, slots: int, rank: int) -> None:
        """Room for ``slots`` slots of rank up to ``rank`` (copies into bigger stacks)."""
        have_slots, have_rank = self.a.shape[0], self.a.shape[1]
        if slots <= have_slots and rank <= have_rank:
            return
        new_slots = max(slots, 2 * have_slots, 4) if slots > have_slots else have_slots
        new_rank = max(rank, have_rank)
        a = self.a.new_zeros(new_slots, new_rank, self.in_features)
        b = self.b.new_zeros(new_slots, self.out_features, new_rank)
        a[:have_slots, :have_rank] = self.a
        b[:have_slots, :, :have_rank] = self.b
        self.a, self.b = a, b
        self.ranks += [0] * (new_slots - len(self.ranks))
        self.scalings += [0.0] * (new_slots - len(self.scalings))

    def put(self, slot: int, factors: LoraFactors | None) -> None:
        rank = 0 if factors is None else int(factors.a.shape[0])
        self.ensure(slot + 1, rank)
        self.a[slot].zero_()
        self.b[slot].zero_()
        if factors is not None:
            self.a[slot, :rank] = factors.a
            self.b[slot, :, :rank] = factors.b
        self.ranks[slot] = rank
        self.scalings[slot] = 0.0 if factors is None else factors.scaling


class LoraBank:
    """The LoRA factors of many adapters for a set of linears (see the module docstring).

    Args:
        linears: the adaptable layers by name (``blocks.3.attn.qkv``), for their shapes.
        dtype, device: of the stacks (the encoder's; the update runs in its dtype).
    """

    def __init__(self, linears: Mapping[str, torch.nn.Linear], *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self._shapes = {name: (m.in_features, m.out_features) for name, m in linears.items()}
        self.dtype, self.device = dtype, torch.device(device)
        self._layers: dict[str, _Layer] = {}
        self._slots: dict[str, int] = {}  # adapter key -> slot index
        self._layers_of: dict[str, frozenset[str]] = {}
        self._free: list[int] = []

    # ------------------------------------------------------------------------------ contents
    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def keys(self) -> list[str]:
        return list(self._slots)

    def slot(self, key: str) -> int:
        """The bank index of adapter ``key`` (KeyError if it is not resident)."""
        return self._slots[key]

    def layers(self, key: str) -> frozenset[str]:
        """The layers adapter ``key`` adapts."""
        return self._layers_of[key]

    def first_block(self, key: str | None) -> int | None:
        """The lowest encoder block adapter ``key`` adapts (None: no adapter, or no block)."""
        if key is None:
            return None
        blocks = [int(m.group(1)) for m in map(_BLOCK.search, self._layers_of[key]) if m]
        return min(blocks) if blocks else None

    def nbytes(self) -> int:
        """Bytes of the stacks (every slot, free ones included)."""
        return sum(t.a.numel() * t.a.element_size() + t.b.numel() * t.b.element_size()
                   for t in self._layers.values())

    def factors(self, key: str) -> dict[str, LoraFactors]:
        """Adapter ``key``'s factors as stored (the bank's dtype)."""
        slot = self._slots[key]
        out = {}
        for name in self._layers_of[key]:
            layer = self._layers[name]
            rank = layer.ranks[slot]
            out[name] = LoraFactors(layer.a[slot, :rank], layer.b[slot, :, :rank],
                                    layer.scalings[slot])
        return out

    def delta_weights(self, key: str) -> dict[str, Tensor]:
        """``ΔW`` (float32, out x in) of each layer adapter ``key`` adapts, to fold."""
        return {name: f.delta() for name, f in self.factors(key).items()}

    # ------------------------------------------------------------------------------ changes
    def add(self, key: str, factors: Mapping[str, LoraFactors]) -> int:
        """Make adapter ``key`` resident (ConfigError when it is already, or a factor does not
        fit its layer); returns its slot. Not thread-safe against :meth:`apply`: the caller
        keeps forwards out meanwhile."""
        if key in self._slots:
            raise ConfigError(f"adapter {key!r} is resident already")
        if not factors:
            raise ConfigError(f"adapter {key!r} adapts no layer")
        for name, f in factors.items():
            if name not in self._shapes:
                raise ConfigError(f"no linear layer named {name!r} to adapt")
            fan_in, fan_out = self._shapes[name]
            rank = f.a.shape[0]
            if f.a.dim() != 2 or f.b.dim() != 2 or tuple(f.a.shape) != (rank, fan_in) or (
                    tuple(f.b.shape) != (fan_out, rank)) or rank < 1:
                raise ConfigError(f"{name}: LoRA factors {tuple(f.a.shape)} and "
                                  f"{tuple(f.b.shape)} do not fit a {fan_in} -> {fan_out} linear")
        slot = self._free.pop() if self._free else len(self._slots)
        for name, f in factors.items():
            if name not in self._layers:
                fan_in, fan_out = self._shapes[name]
                self._layers[name] = _Layer(fan_in, fan_out, self.dtype, self.device)
            self._layers[name].put(slot, LoraFactors(
                f.a.to(self.device, self.dtype), f.b.to(self.device, self.dtype), f.scaling))
        self._slots[key] = slot
        self._layers_of[key] = frozenset(factors)
        return slot

    def remove(self, key: str) -> None:
        """Forget adapter ``key`` (its slot is zeroed and reused); a missing key is ignored."""
        slot = self._slots.pop(key, None)
        if slot is None:
            return
        for name in self._layers_of.pop(key):
            self._layers[name].put(slot, None)
        self._free.append(slot)

    # ------------------------------------------------------------------------------ applying
    def adapts(self, name: str) -> bool:
        return name in self._layers

    @torch.no_grad()
    def apply(self, name: str, x: Tensor, out: Tensor, runs: RowRuns) -> None:
        """Add each run's LoRA update to ``out`` in place.

        x: the layer's input, B·k x ... x in (k rows per image: windows); out: its output,
        B·k x ... x out, from the base linear. Runs whose slot is None, or whose adapter does
        not adapt this layer, are left as they are.
        """
        layer = self._layers.get(name)
        if layer is None:
            return
        if x.shape[0] % runs.images:
            raise ConfigError(f"{name}: {x.shape[0]} rows are not a multiple of "
                              f"{runs.images} images")
        per = x.shape[0] // runs.images
        for start, stop, slot in runs.runs:
            if slot is None or not layer.ranks[slot]:
                continue
            rank = layer.ranks[slot]
            rows = slice(start * per, stop * per)
            # PEFT's own order of operations: lora_B(lora_A(x)) * scaling, then added
            b = layer.b[slot, :, :rank]
            b = b if b.is_contiguous() else b.contiguous()  # the layout PEFT's lora_B has
            update = F.linear(F.linear(x[rows], layer.a[slot, :rank]), b)
            out[rows] += update * layer.scalings[slot]


def slots_of(bank: LoraBank, keys: Iterable[str | None]) -> list[int | None]:
    """Bank slots of adapter ``keys`` (None stays None; KeyError for one not resident)."""
    return [None if key is None else bank.slot(key) for key in keys]
