"""Whole-adapter merge functions, registered by name (mergekit style).

An adapter is a ``dict[str, Tensor]`` in PEFT state-dict naming, e.g.
``base_model.model.image_encoder.blocks.3.attn.qkv.lora_A.weight`` (r x in) and
``...qkv.lora_B.weight`` (out x r). Its statistics are a ``dict[str, Tensor]`` keyed as
:mod:`regcl.adapters.layout` says (``K.gram``: in x in, ``K.count``: 0-dim).

Which methods exist, what they need and their parameters is :mod:`regcl.merging.catalogue`;
here each catalogue entry gets its function ``(adapters, stats, params) -> adapter``, decorated
with :func:`register_merge_method`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from regcl.adapters.layout import count_key, gram_key, weight_key_of_gram
from regcl.errors import ConfigError, MergeError, StatsError
from regcl.merging.catalogue import (
    CoreSpaceParams,
    MagmaxParams,
    MeanParams,
    MergeParams,
    MethodInfo,
    RegclParams,
    RegclProductParams,
    TaskArithmeticParams,
    TiesParams,
    method_info,
)
from regcl.merging.core_space import core_space_merge
from regcl.merging.merge_utils import (
    gram_scale,
    magmax_merge,
    mean_merge,
    product_regmean_merge,
    regmean_merge,
    task_arithmetic_merge,
    ties_merge,
)

logger = logging.getLogger(__name__)

Adapter = Mapping[str, Tensor]
Stats = Mapping[str, Tensor]

# How one adapter key is merged by the Gram-based methods.
UNIT_REGMEAN = "regmean"  # RegMean with this key's own Gram
UNIT_MEAN = "mean"  # no statistics: plain mean
UNIT_PRODUCT_A = "product_A"  # lora_A of a pair merged as B @ A with the lora_A Gram
UNIT_PRODUCT_B = "product_B"  # lora_B of such a pair; produced together with its lora_A

_LORA_A = re.compile(r"^(?P<prefix>.+)\.lora_A(?P<suffix>(\.[^.]+)?\.weight)$")


def is_lora_key(key: str) -> bool:
    """True for LoRA factor weights (``...lora_A.weight`` / ``...lora_B.weight``)."""
    return ".lora_A." in key or ".lora_B." in key


def lora_b_key(lora_a_key: str) -> str | None:
    """The ``lora_B`` key paired with a ``lora_A`` key, or None if ``lora_a_key`` is not one."""
    match = _LORA_A.match(lora_a_key)
    if match is None:
        return None
    return f"{match['prefix']}.lora_B{match['suffix']}"


# ---------------------------------------------------------------------------------------------
# Registry

MergeFn = Callable[[Sequence[Adapter], Sequence[Stats] | None, Any], dict[str, Tensor]]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its catalogue entry and whole-adapter merge function."""

    info: MethodInfo
    merge: MergeFn

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def params_type(self) -> type[MergeParams]:
        return self.info.params_type

    @property
    def needs_stats(self) -> bool:
        return self.info.needs_stats


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(name: str) -> Callable[[MergeFn], MergeFn]:
    """Decorator registering ``fn(adapters, stats, params) -> adapter`` as catalogue method
    ``name`` (ConfigError for a name the catalogue lacks or one registered already)."""
    info = method_info(name)

    def decorator(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS:
            raise ConfigError(f"merge method {name!r} is already registered")
        MERGE_METHODS[name] = MergeMethod(info, fn)
        return fn

    return decorator


def available_methods() -> list[str]:
    """Names of the registered merge methods, sorted."""
    return sorted(MERGE_METHODS)


def get_merge_method(name: str) -> MergeMethod:
    """The registered method called ``name``; ConfigError listing the known names otherwise."""
    method_info(name)  # ConfigError for unknown names, listing the known ones
    return MERGE_METHODS[name]


def make_params(method: str, **params: Any) -> MergeParams:
    """Validated parameters of ``method`` from keyword arguments (ConfigError when invalid)."""
    params_type = get_merge_method(method).params_type
    known = [field.name for field in dataclasses.fields(params_type)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {unknown} for merge method {method!r}; "
            f"it takes: {known or 'no parameters'}"
        )
    return params_type(**params)


# ---------------------------------------------------------------------------------------------
# Validation shared by merge_adapters and the continual state


def check_adapter(adapter: Adapter, index: int) -> None:
    """Every value of ``adapter`` is a finite floating-point tensor (MergeError otherwise)."""
    if not isinstance(adapter, Mapping) or len(adapter) == 0:
        raise MergeError(f"adapter {index} must be a non-empty dict of tensors")
    for key, value in adapter.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise MergeError(f"adapter {index}: {key!r} is not a floating-point tensor")
        if not bool(value.isfinite().all()):
            raise MergeError(f"adapter {index}: {key!r} contains NaN or infinite values")


def check_same_layout(shapes: Mapping[str, tuple[int, ...]], adapter: Adapter, index: int) -> None:
    """``adapter`` has exactly the keys of ``shapes``, with those shapes (MergeError otherwise)."""
    missing = sorted(set(shapes) - set(adapter))
    extra = sorted(set(adapter) - set(shapes))
    if missing or extra:
        raise MergeError(
            f"adapter {index} has different keys: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for key, shape in shapes.items():
        if tuple(adapter[key].shape) != tuple(shape):
            raise MergeError(
                f"adapter {index}: {key!r} has shape {tuple(adapter[key].shape)}, "
                f"expected {tuple(shape)}"
            )


def check_adapters(adapters: Sequence[Adapter]) -> None:
    """Non-empty, all finite, all with the keys and shapes of the first (MergeError otherwise)."""
    if len(adapters) == 0:
        raise MergeError("nothing to merge: no adapters given")
    for index, adapter in enumerate(adapters):
        check_adapter(adapter, index)
    shapes = {key: tuple(value.shape) for key, value in adapters[0].items()}
    for index, adapter in enumerate(adapters[1:], start=1):
        check_same_layout(shapes, adapter, index)


def _check_gram_stats(adapter: Adapter, stats: Stats, key: str, index: int) -> None:
    weight, gram = adapter[key], stats[gram_key(key)]
    if weight.dim() != 2:
        raise StatsError(f"adapter {index}: Gram given for {key!r}, which is not a 2-D weight")
    in_dim = weight.shape[1]
    if not isinstance(gram, Tensor) or tuple(gram.shape) != (in_dim, in_dim):
        shape = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
        raise StatsError(
            f"adapter {index}: {gram_key(key)!r} has shape {shape}, expected {(in_dim, in_dim)}"
        )
    if not gram.is_floating_point() or not bool(gram.isfinite().all()):
        raise StatsError(f"adapter {index}: {gram_key(key)!r} is not a finite float tensor")
    count = stats.get(count_key(key))
    if not isinstance(count, Tensor) or count.numel() != 1:
        raise StatsError(f"adapter {index}: {count_key(key)!r} (a 0-dim token count) is missing")
    if not (math.isfinite(float(count)) and float(count) >= 0):
        raise StatsError(f"adapter {index}: {count_key(key)!r} must be finite and ≥ 0")


def plan_units(adapter: Adapter, stats: Stats, index: int, *, product: bool) -> dict[str, str]:
    """How each key of one adapter is merged by ``regcl`` (or ``regcl_product`` if ``product``).

    Returns key -> one of the ``UNIT_*`` names, in the adapter's key order. Raises StatsError
    for missing or mismatched statistics (naming ``index`` and the key) and MergeError for a
    lora_A without its lora_B.
    """
    if not isinstance(stats, Mapping):
        raise StatsError(f"adapter {index}: statistics must be a dict of tensors")
    stray = [k for k in stats if (w := weight_key_of_gram(k)) is not None and w not in adapter]
    if stray:
        raise StatsError(f"adapter {index}: Grams for keys the adapter lacks: {stray[:5]}")
    units: dict[str, str] = {}
    for key in adapter:
        b_key = lora_b_key(key) if product else None
        if b_key is not None:
            if b_key not in adapter:
                raise MergeError(f"adapter {index}: {key!r} has no matching {b_key!r}")
            a, b = adapter[key], adapter[b_key]
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise MergeError(
                    f"adapter {index}: {key!r} {tuple(a.shape)} and {b_key!r} "
                    f"{tuple(b.shape)} are not r x in and out x r"
                )
            units[b_key] = UNIT_PRODUCT_B
            needs_gram = True
        elif product and ".lora_B." in key:
            continue  # decided by its lora_A; orphans are caught below
        else:
            needs_gram = is_lora_key(key)
        has_gram = gram_key(key) in stats
        if needs_gram and not has_gram:
            raise StatsError(f"adapter {index}: no Gram statistics {gram_key(key)!r}")
        if has_gram:
            _check_gram_stats(adapter, stats, key, index)
        if b_key is not None:
            units[key] = UNIT_PRODUCT_A
        else:
            units[key] = UNIT_REGMEAN if has_gram else UNIT_MEAN
    orphans = [key for key in adapter if key not in units]
    if orphans:
        raise MergeError(f"adapter {index}: lora_B keys without a lora_A: {orphans[:5]}")
    return {key: units[key] for key in adapter}


def compare_plans(reference: Mapping[str, str], plan: Mapping[str, str], index: int) -> None:
    """StatsError naming ``index`` and the first key whose statistics differ from the reference."""
    for key, unit in reference.items():
        if plan[key] != unit:
            has = "has" if plan[key] == UNIT_REGMEAN else "lacks"
            raise StatsError(
                f"adapter {index} {has} Gram statistics for {key!r}, unlike the other adapters"
            )


def _plan_all(
    adapters: Sequence[Adapter], stats: Sequence[Stats], *, product: bool
) -> dict[str, str]:
    reference = plan_units(adapters[0], stats[0], 0, product=product)
    for index in range(1, len(adapters)):
        compare_plans(
            reference, plan_units(adapters[index], stats[index], index, product=product), index
        )
    return reference


# ---------------------------------------------------------------------------------------------
# Methods


@register_merge_method("regcl")
def merge_regcl(
    adapters: Sequence[Adapter], stats: Sequence[Stats] | None, params: RegclParams
) -> dict[str, Tensor]:
    """RegCL: RegMean on every lora_A and lora_B weight, each with its own input Gram.

    Keys without statistics (other than LoRA factors, which must have them) are averaged.
    """
    assert stats is not None  # merge_adapters enforces needs_stats
    plan = _plan_all(adapters, stats, product=False)
    merged: dict[str, Tensor] = {}
    for key, unit in plan.items():
        weights = [adapter[key] for adapter in adapters]
        if unit == UNIT_REGMEAN:
            grams = [s[gram_key(key)] for s in stats]
            merged[key] = regmean_merge(weights, grams, ridge=params.ridge, alpha=params.alpha,
                                        scales=gram_scales(stats, key, params.weighting))
        else:
            merged[key] = mean_merge(weights)
    return merged


def gram_scales(stats: Sequence[Stats], key: str, weighting: str) -> list[float]:
    """Each domain's factor on its Gram of ``key`` under ``weighting`` (:func:`gram_scale`)."""
    return [gram_scale(s[gram_key(key)], float(s[count_key(key)]), weighting) for s in stats]


@register_merge_method("regcl_product")
def merge_regcl_product(
    adapters: Sequence[Adapter], stats: Sequence[Stats] | None, params: RegclProductParams
) -> dict[str, Tensor]:
    """RegMean on each LoRA product B @ A with the lora_A (module input) Gram, re-factored by SVD.

    The rank of the result is each pair's own rank; lora_B Grams are not used. Other keys are
    merged as in ``regcl``.
    """
    assert stats is not None
    plan = _plan_all(adapters, stats, product=True)
    merged: dict[str, Tensor] = {}
    for key, unit in plan.items():
        weights = [adapter[key] for adapter in adapters]
        if unit == UNIT_PRODUCT_A:
            b_key = lora_b_key(key)
            assert b_key is not None
            pairs = [(adapter[key], adapter[b_key]) for adapter in adapters]
            grams = [s[gram_key(key)] for s in stats]
            merged[key], merged[b_key] = product_regmean_merge(
                pairs, grams, rank=weights[0].shape[0], ridge=params.ridge, alpha=params.alpha,
                scales=gram_scales(stats, key, params.weighting),
            )
        elif unit == UNIT_REGMEAN:
            grams = [s[gram_key(key)] for s in stats]
            merged[key] = regmean_merge(weights, grams, ridge=params.ridge, alpha=params.alpha,
                                        scales=gram_scales(stats, key, params.weighting))
        elif unit == UNIT_MEAN:
            merged[key] = mean_merge(weights)
    return {key: merged[key] for key in plan}


@register_merge_method("mean")
def merge_mean(
    adapters: Sequence[Adapter], stats: Sequence[Stats] | None, params: MeanParams
) -> dict[str, Tensor]:
    """Element-wise mean of every weight."""
    return {key: mean_merge([a[key] for a in adapters]) for key in adapters[0]}


@register_merge_method("task_arithmetic")
def merge_task_arithmetic(
    adapters: Sequence[Adapter], stats: Sequence[Stats] | None, params: TaskArithmeticParams
) -> dict[str, Tensor]:
    """Task arithmetic: scale · Σ_t W_t for every weight.

    Applied to lora_A and lora_B separately, the merged product is scale² · (Σ B_t)(Σ A_t),
    which includes the cross terms B_i A_j; that is the usual LoRA baseline, kept as is.
    """
    return {
        key: task_arithmetic_merge([a[key] for a in adapters], scale=params.scale)
        for key in adapters[0]
    }


@register_merge_method("ties")
def merge_ties(
    adapters: Sequence[Adapter], stats: Sequence[Stats] | None, params: TiesParams
) -> dict[str, Tensor]:
    """TIES-Merging (trim, elect sign, disjoint mean) of every weight, lora_A and lora_B apart."""
    return {
        key: ties_merge([a[key] for a in adapters], density=params.density, scale=params.scale)
        for key in adapters[0]
    }


@register_merge_method("magmax")
def merge_magmax(
    adapters: Sequence[Adapter], stats: Sequence[Stats] | None, params: MagmaxParams
) -> dict[str, Tensor]:
    """MagMax: per element, the value of largest magnitude across adapters."""
    return {key: magmax_merge([a[key] for a in adapters]) for key in adapters[0]}


@register_merge_method("core_space")
def merge_core_space(
    adapters: Sequence[Adapter], stats: Sequence[Stats] | None, params: CoreSpaceParams
) -> dict[str, Tensor]:
    """Core Space merging (NeurIPS 2025, :mod:`regcl.merging.core_space`): each lora_A /
    lora_B pair merged as core matrices and re-factored to its rank; other keys averaged."""
    first = adapters[0]
    merged: dict[str, Tensor] = {}
    for key in first:
        b_key = lora_b_key(key)
        if b_key is not None and b_key in first:
            pairs = [(adapter[key], adapter[b_key]) for adapter in adapters]
            merged[key], merged[b_key] = core_space_merge(
                pairs, rank=first[key].shape[0], inner=params.inner, density=params.density,
                scale=params.scale)
    for key in first:
        if key not in merged:
            merged[key] = mean_merge([adapter[key] for adapter in adapters])
    return {key: merged[key] for key in first}


def merge_adapters(
    method: str,
    adapters: Sequence[Adapter],
    stats: Sequence[Stats] | None = None,
    **params: Any,
) -> dict[str, Tensor]:
    """Merges whole adapters with the registered ``method`` and its keyword ``params``.

    adapters: T adapters with identical keys and shapes.
    stats:    T statistics dicts (``K.gram``: in x in, ``K.count``: 0-dim), required by the
              methods whose catalogue entry ``needs_stats``, ignored by the others.
    Returns one adapter with the same keys and shapes. Raises ConfigError (unknown method or
    bad parameters), MergeError (mismatched or non-finite adapters), StatsError (statistics
    missing or not matching their adapter).
    """
    spec = get_merge_method(method)
    typed_params = make_params(method, **params)
    check_adapters(adapters)
    if spec.needs_stats:
        if stats is None:
            raise StatsError(f"merge method {method!r} needs Gram statistics for every adapter")
        if len(stats) != len(adapters):
            raise StatsError(f"got {len(adapters)} adapters but {len(stats)} statistics dicts")
    logger.info("merging %d adapters with %s %s", len(adapters), method, typed_params)
    return spec.merge(adapters, stats, typed_params)
