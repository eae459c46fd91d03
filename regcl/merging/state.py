"""The continual merge state: running sums that fold in one domain adapter at a time.

RegCL never keeps old adapters or images: for each merged weight it keeps ``Σ_t G̃_t`` (in x in),
``Σ_t G̃_t W_tᵀ`` (in x out), ``Σ_t W_t`` (out x in, the ridge's pull-to-mean target) and the token
count sum, so memory stays constant however many domains are folded in. ``merged()`` equals
:func:`~regcl.merging.methods.merge_adapters` over all adapters folded so far.

Persisted with safetensors (tensors + a JSON string in the file metadata); never pickle.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from regcl.adapters.layout import count_key, gram_key
from regcl.errors import ConfigError, MergeError, StatsError
from regcl.merging.catalogue import STREAMING_METHODS, method_info
from regcl.merging.merge_utils import (
    gram_scale,
    product_delta,
    refactor_low_rank,
    regmean_solve,
    regmean_terms,
)
from regcl.merging.methods import (
    UNIT_MEAN,
    UNIT_PRODUCT_A,
    UNIT_PRODUCT_B,
    UNIT_REGMEAN,
    Adapter,
    MergeParams,
    Stats,
    check_adapter,
    check_same_layout,
    compare_plans,
    lora_b_key,
    make_params,
    plan_units,
)

__all__ = ["STREAMING_METHODS", "ContinualMergeState"]

logger = logging.getLogger(__name__)

_METADATA_KEY = "regcl_merge_state"
_FORMAT_VERSION = 1
_SEP = "::"  # between a weight key and the name of one of its sums; never in PEFT keys
_UNIT_ELEMENTWISE = "elementwise"  # mean / task_arithmetic / magmax: one tensor per key
_UNITS = {  # the units each Gram-based method's layout may hold
    "regcl": {UNIT_REGMEAN, UNIT_MEAN},
    "regcl_product": {UNIT_REGMEAN, UNIT_MEAN, UNIT_PRODUCT_A, UNIT_PRODUCT_B},
}
_FLOAT_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


class ContinualMergeState:
    """Constant-memory RegCL state: fold adapters in one by one, read the merge at any time.

    method: one of :data:`STREAMING_METHODS`; ``params``: that method's parameters.
    """

    def __init__(self, method: str = "regcl", **params: Any) -> None:
        info = method_info(method)  # ConfigError for unknown names, listing the known ones
        if not info.streams:
            raise ConfigError(f"merge method {method!r} cannot be used continually: "
                              f"{info.why_not_streaming}")
        self._needs_stats = info.needs_stats
        self._method = method
        self._params: MergeParams = make_params(method, **params)
        # key -> {"shape": [...], "dtype": "float32", "unit": UNIT_*}; None until the first fold
        self._layout: dict[str, dict[str, Any]] | None = None
        self._sums: dict[str, Tensor] = {}
        self._domains: list[str] = []

    # -- read-only views -----------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self._method

    @property
    def params(self) -> MergeParams:
        return self._params

    @property
    def num_domains(self) -> int:
        return len(self._domains)

    @property
    def domains(self) -> tuple[str, ...]:
        """Lineage: the domain names folded in, oldest first."""
        return tuple(self._domains)

    def nbytes(self) -> int:
        """Bytes of tensor memory held; independent of the number of domains folded in."""
        return sum(t.numel() * t.element_size() for t in self._sums.values())

    def __repr__(self) -> str:
        return (
            f"ContinualMergeState(method={self._method!r}, params={self._params}, "
            f"domains={self._domains}, nbytes={self.nbytes()})"
        )

    # -- folding -------------------------------------------------------------------------------

    def _plan(self, adapter: Adapter, stats: Stats | None, index: int) -> dict[str, str]:
        if not self._needs_stats:
            return {key: _UNIT_ELEMENTWISE for key in adapter}
        if stats is None:
            raise StatsError(
                f"merge method {self._method!r} needs Gram statistics for adapter {index}"
            )
        return plan_units(adapter, stats, index, product=self._method == "regcl_product")

    def _contributions(
        self, adapter: Adapter, stats: Stats | None, plan: Mapping[str, str]
    ) -> dict[str, Tensor]:
        """One adapter's terms for every running sum (float64; magmax: the new running max)."""
        alpha = getattr(self._params, "alpha", 1.0)
        weighting = getattr(self._params, "weighting", "domain")
        terms: dict[str, Tensor] = {}
        for key, unit in plan.items():
            weight = adapter[key]
            if unit == _UNIT_ELEMENTWISE and self._method == "magmax":
                dtype = _FLOAT_DTYPES[self._layout[key]["dtype"]] if self._layout else weight.dtype
                current = self._sums.get(f"{key}{_SEP}max_magnitude")
                new = weight.to(dtype=dtype, device=None if current is None else current.device)
                terms[f"{key}{_SEP}max_magnitude"] = (
                    new.clone()
                    if current is None
                    else torch.where(new.abs() > current.abs(), new, current)
                )
            elif unit in (UNIT_REGMEAN, UNIT_PRODUCT_A):
                assert stats is not None
                if unit == UNIT_PRODUCT_A:
                    weight = product_delta(weight, adapter[lora_b_key(key)])  # out x in
                gram = stats[gram_key(key)]
                scale = gram_scale(gram, float(stats[count_key(key)]), weighting)
                gram_t, gram_weight_t = regmean_terms(weight, gram, alpha=alpha, scale=scale)
                terms[f"{key}{_SEP}gram_sum"] = gram_t
                terms[f"{key}{_SEP}gram_weight_sum"] = gram_weight_t
                terms[f"{key}{_SEP}count_sum"] = (
                    stats[count_key(key)].to(torch.float64).reshape(()).clone()
                )
                terms[f"{key}{_SEP}weight_sum"] = weight.to(torch.float64)
            elif unit != UNIT_PRODUCT_B:  # mean units and mean / task_arithmetic elements
                terms[f"{key}{_SEP}weight_sum"] = weight.to(torch.float64)
        return terms

    def fold(self, adapter: Adapter, stats: Stats | None = None, *, domain: str) -> None:
        """Folds one domain's adapter (and its statistics) into the running sums.

        adapter: the domain's LoRA weights; stats: its Grams (needed by regcl, regcl_product);
        domain: a unique name recorded in the lineage. Everything is validated before the state
        changes, so a failed fold (MergeError / StatsError) leaves the state as it was.
        """
        index = self.num_domains
        if not isinstance(domain, str) or not domain:
            raise MergeError("domain must be a non-empty string")
        if domain in self._domains:
            raise MergeError(
                f"domain {domain!r} is already folded in; a fold cannot be undone, "
                "so folding it again would count it twice"
            )
        check_adapter(adapter, index)
        unsupported = {str(v.dtype) for v in adapter.values()} - {
            str(d) for d in _FLOAT_DTYPES.values()
        }
        if unsupported:
            raise MergeError(f"adapter {index}: unsupported dtypes {sorted(unsupported)}")
        if self._layout is not None:
            check_same_layout(
                {k: tuple(v["shape"]) for k, v in self._layout.items()}, adapter, index
            )
        plan = self._plan(adapter, stats, index)
        if self._layout is not None:
            compare_plans({k: v["unit"] for k, v in self._layout.items()}, plan, index)
        terms = self._contributions(adapter, stats, plan)
        if self._sums:  # keep every sum on the device the state lives on
            device = next(iter(self._sums.values())).device
            terms = {name: term.to(device) for name, term in terms.items()}

        # Nothing below can fail: commit.
        if self._layout is None:
            self._layout = {
                key: {
                    "shape": list(adapter[key].shape),
                    "dtype": str(adapter[key].dtype).removeprefix("torch."),
                    "unit": unit,
                }
                for key, unit in plan.items()
            }
            # Copies: a float64 term may alias the caller's tensor, and sums are updated in place.
            self._sums = {name: term.clone() for name, term in terms.items()}
        else:
            for name, term in terms.items():
                if name.endswith(f"{_SEP}max_magnitude"):
                    self._sums[name] = term
                else:
                    self._sums[name] += term
        self._domains.append(domain)
        logger.info(
            "folded domain %r into the %s state (%d domains)",
            domain,
            self._method,
            self.num_domains,
        )

    # -- reading the merge ---------------------------------------------------------------------

    def merged(self) -> dict[str, Tensor]:
        """The merged adapter of every domain folded so far (same keys, shapes and dtypes)."""
        if self._layout is None:
            raise MergeError("the merge state is empty: fold at least one adapter first")
        count = self.num_domains
        ridge = getattr(self._params, "ridge", 0.0)
        merged: dict[str, Tensor] = {}
        for key, entry in self._layout.items():
            unit, dtype = entry["unit"], _FLOAT_DTYPES[entry["dtype"]]
            sums = {
                name: self._sums.get(f"{key}{_SEP}{name}")
                for name in ("weight_sum", "gram_sum", "gram_weight_sum", "max_magnitude")
            }
            if unit == UNIT_PRODUCT_B:
                continue  # written together with its lora_A
            if self._method == "magmax":
                merged[key] = sums["max_magnitude"].clone()
            elif self._method == "task_arithmetic":
                merged[key] = (self._params.scale * sums["weight_sum"]).to(dtype)
            elif unit in (UNIT_MEAN, _UNIT_ELEMENTWISE):
                merged[key] = (sums["weight_sum"] / count).to(dtype)
            elif unit == UNIT_REGMEAN:
                merged[key] = regmean_solve(
                    sums["gram_sum"],
                    sums["gram_weight_sum"],
                    ridge=ridge,
                    weight_mean=sums["weight_sum"] / count,
                    out_dtype=dtype,
                )
            else:  # UNIT_PRODUCT_A
                delta = regmean_solve(
                    sums["gram_sum"],
                    sums["gram_weight_sum"],
                    ridge=ridge,
                    weight_mean=sums["weight_sum"] / count,
                    out_dtype=torch.float64,
                )
                b_key = lora_b_key(key)
                a, b = refactor_low_rank(delta, entry["shape"][0])
                merged[key] = a.to(dtype)
                merged[b_key] = b.to(_FLOAT_DTYPES[self._layout[b_key]["dtype"]])
        return {key: merged[key] for key in self._layout}

    # -- persistence ---------------------------------------------------------------------------

    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """``(tensors, metadata)`` as written to safetensors; tensors are copies."""
        header = {
            "format": _FORMAT_VERSION,
            "method": self._method,
            "params": self._params.to_dict(),
            "domains": self._domains,
            "layout": self._layout,
        }
        tensors = {name: t.detach().clone().contiguous() for name, t in self._sums.items()}
        return tensors, {_METADATA_KEY: json.dumps(header)}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
    ) -> ContinualMergeState:
        """Rebuilds a state written by :meth:`to_tensors`; MergeError when it does not add up."""
        try:
            header = json.loads(metadata[_METADATA_KEY])
            version, method = header["format"], header["method"]
            params, domains, layout = header["params"], header["domains"], header["layout"]
        except (KeyError, TypeError, ValueError) as error:
            raise MergeError(f"not a regcl merge state (bad metadata: {error})") from None
        if version != _FORMAT_VERSION:
            raise MergeError(f"unsupported merge state format {version!r}")
        state = cls(method, **params)
        if (
            not isinstance(domains, list)
            or not all(isinstance(d, str) for d in domains)
            or len(set(domains)) != len(domains)
        ):
            raise MergeError("merge state metadata: domains must be a list of unique strings")
        if (layout is None) != (len(domains) == 0):
            raise MergeError("merge state metadata: layout and domains disagree")
        expected = state._expected_sums(layout or {})
        if set(expected) != set(tensors):
            missing, extra = (
                sorted(set(expected) - set(tensors)),
                sorted(set(tensors) - set(expected)),
            )
            raise MergeError(
                f"merge state tensors do not match its layout: missing "
                f"{missing[:5]}, unexpected {extra[:5]}"
            )
        for name, (shape, dtype) in expected.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise MergeError(
                    f"merge state tensor {name!r} is {tuple(tensor.shape)} "
                    f"{tensor.dtype}, expected {shape} {dtype}"
                )
            if not bool(tensor.isfinite().all()):
                raise MergeError(f"merge state tensor {name!r} has NaN or infinite values")
        state._layout = layout
        state._sums = {name: tensors[name].clone() for name in expected}
        state._domains = list(domains)
        return state

    def _expected_sums(
        self, layout: Mapping[str, Any]
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every running sum a layout implies."""
        f64 = torch.float64
        allowed = _UNITS.get(self._method, {_UNIT_ELEMENTWISE})
        expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        try:
            for key, entry in layout.items():
                unit, shape = entry["unit"], tuple(int(n) for n in entry["shape"])
                dtype = _FLOAT_DTYPES[entry["dtype"]]
                if unit not in allowed:
                    raise KeyError(f"unit {unit!r} of {key!r} is not one of {self._method!r}")
                if unit == _UNIT_ELEMENTWISE and self._method == "magmax":
                    expected[f"{key}{_SEP}max_magnitude"] = (shape, dtype)
                elif unit in (_UNIT_ELEMENTWISE, UNIT_MEAN):
                    expected[f"{key}{_SEP}weight_sum"] = (shape, f64)
                elif unit in (UNIT_REGMEAN, UNIT_PRODUCT_A):
                    if unit == UNIT_PRODUCT_A:
                        shape = (int(layout[lora_b_key(key)]["shape"][0]), shape[1])
                    out_dim, in_dim = shape
                    expected[f"{key}{_SEP}gram_sum"] = ((in_dim, in_dim), f64)
                    expected[f"{key}{_SEP}gram_weight_sum"] = ((in_dim, out_dim), f64)
                    expected[f"{key}{_SEP}weight_sum"] = ((out_dim, in_dim), f64)
                    expected[f"{key}{_SEP}count_sum"] = ((), f64)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise MergeError(f"merge state metadata: malformed layout ({error!r})") from None
        return expected

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the state to one safetensors file at ``path``."""
        tensors, metadata = self.to_tensors()
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ContinualMergeState:
        """Reads a state written by :meth:`save`."""
        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return cls.from_tensors(load_file(os.fspath(path)), metadata)
