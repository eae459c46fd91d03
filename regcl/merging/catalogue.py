"""The merge methods by name: what each needs, whether it streams, and its typed parameters.

The one list of merge methods (it imports no torch, so the API and the job-parameter models
can import it): :mod:`regcl.merging.methods` registers a whole-adapter merge function for each
entry, :class:`~regcl.merging.state.ContinualMergeState` folds the streaming ones, and
:mod:`workers.params` derives its pydantic models (and so the HTTP API's schema) from the
parameter dataclasses here, bounds included.

Adding a method: a frozen :class:`MergeParams` dataclass (each number a :func:`bounded`
field, each named option a :func:`chosen` one), an entry in :data:`CATALOGUE`, and its
function in :mod:`regcl.merging.methods`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from regcl.errors import ConfigError

__all__ = [
    "CATALOGUE",
    "CORE_INNER_METHODS",
    "GRAM_WEIGHTINGS",
    "STATS_METHODS",
    "STREAMING_METHODS",
    "Bound",
    "Choice",
    "CoreSpaceParams",
    "MagmaxParams",
    "MeanParams",
    "MergeParams",
    "MethodInfo",
    "RegclParams",
    "RegclProductParams",
    "TaskArithmeticParams",
    "TiesParams",
    "bounded",
    "chosen",
    "method_info",
    "parameter_bounds",
]


@dataclass(frozen=True)
class Bound:
    """The range of a numeric parameter: finite, ``low`` ≤ value ≤ ``high`` (``low`` <
    value when ``low_open``)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False

    def check(self, name: str, value: object) -> float:
        """``value`` as a float, or ConfigError naming ``name`` and the range."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        above = value > self.low if self.low_open else value >= self.low
        if not (math.isfinite(value) and above and value <= self.high):
            bracket = "(" if self.low_open else "["
            raise ConfigError(f"{name} must be finite and in {bracket}{self.low}, {self.high}]"
                              f", got {value}")
        return float(value)


def bounded(default: float, doc: str, *, low: float = -math.inf, high: float = math.inf,
            low_open: bool = False) -> Any:
    """A dataclass field for a number in a :class:`Bound` (stated once, checked by
    :class:`MergeParams`, published by the job-parameter models)."""
    return dataclasses.field(default=default, metadata={
        "bound": Bound(low, high, low_open), "doc": doc})


@dataclass(frozen=True)
class Choice:
    """A parameter that names one of ``options``."""

    options: tuple[str, ...]

    def check(self, name: str, value: object) -> str:
        """``value`` if it is one of the options, ConfigError naming ``name`` otherwise."""
        if not isinstance(value, str) or value not in self.options:
            raise ConfigError(f"{name} must be one of {', '.join(self.options)}, got {value!r}")
        return value


def chosen(default: str, doc: str, options: tuple[str, ...]) -> Any:
    """A dataclass field naming one of ``options`` (a :class:`Choice`)."""
    return dataclasses.field(default=default, metadata={"bound": Choice(options), "doc": doc})


def parameter_bounds(params_type: type[MergeParams]
                     ) -> dict[str, tuple[Bound | Choice, float | str, str]]:
    """name → (bound or choice, default, description) of each parameter of ``params_type``."""
    return {f.name: (f.metadata["bound"], f.default, f.metadata["doc"])
            for f in dataclasses.fields(params_type)}


@dataclass(frozen=True)
class MergeParams:
    """Base of every method's parameters: each field is a :func:`bounded` number, checked
    (ConfigError) and stored as a float, so parameters round-trip through JSON unchanged, or a
    :func:`chosen` name."""

    def __post_init__(self) -> None:
        for name, (bound, _, _) in parameter_bounds(type(self)).items():
            object.__setattr__(self, name, bound.check(name, getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """Parameters as a JSON-ready dict."""
        return dataclasses.asdict(self)


GRAM_WEIGHTINGS = ("domain", "tokens", "trace")
"""How RegMean weighs one domain's Gram G = XᵀX/n against the others': ``domain`` as it is
(every domain counts the same, whatever its token count: the default), ``tokens`` by its token
count n (XᵀX: domains with more data count more), ``trace`` divided by its mean diagonal (every
domain's inputs brought to the same energy)."""

CORE_INNER_METHODS = ("ties", "task_arithmetic", "mean", "iso")
"""The merges Core Space merging applies to the small core matrices (``iso``: Iso-C, the sum
with its singular values replaced by their mean)."""


@dataclass(frozen=True)
class RegclParams(MergeParams):
    """RegMean parameters (λ = ridge · mean diagonal of the Gram sum)."""

    ridge: float = bounded(1e-4, "relative ridge, pulling towards the plain mean", low=0.0)
    alpha: float = bounded(1.0, "off-diagonal shrink of each Gram; 1 = no shrink",
                           low=0.0, high=1.0)
    weighting: str = chosen("domain", "how domains' Grams weigh against each other: domain "
                            "(alike), tokens (by token count), trace (by 1 / mean diagonal)",
                            GRAM_WEIGHTINGS)


@dataclass(frozen=True)
class RegclProductParams(RegclParams):
    """Same parameters as :class:`RegclParams`; the rank is the adapters' own LoRA rank."""


@dataclass(frozen=True)
class MeanParams(MergeParams):
    """The plain mean has no parameters."""


@dataclass(frozen=True)
class TaskArithmeticParams(MergeParams):
    """Task arithmetic's one parameter."""

    scale: float = bounded(1.0, "factor on the sum of the task vectors")


@dataclass(frozen=True)
class TiesParams(MergeParams):
    """TIES-Merging's parameters."""

    density: float = bounded(0.2, "fraction of each task's entries kept", low=0.0, high=1.0,
                             low_open=True)
    scale: float = bounded(1.0, "factor on the merged task vector")


@dataclass(frozen=True)
class MagmaxParams(MergeParams):
    """MagMax has no parameters."""


@dataclass(frozen=True)
class CoreSpaceParams(MergeParams):
    """Core Space merging's parameters (:mod:`regcl.merging.core_space`)."""

    inner: str = chosen("ties", "the merge of the core matrices", CORE_INNER_METHODS)
    density: float = bounded(0.2, "fraction of each core's entries TIES keeps", low=0.0,
                             high=1.0, low_open=True)
    scale: float = bounded(1.0, "factor of TIES / task arithmetic / Iso-C")


@dataclass(frozen=True)
class MethodInfo:
    """One merge method. needs_stats: it needs every adapter's Gram statistics; streams: it
    can be folded in domain by domain from running sums (constant memory), so the service
    can merge with it continually; why_not_streaming: the reason when it cannot."""

    name: str
    params_type: type[MergeParams]
    needs_stats: bool
    streams: bool
    summary: str
    why_not_streaming: str = ""


CATALOGUE: dict[str, MethodInfo] = {info.name: info for info in (
    MethodInfo("regcl", RegclParams, needs_stats=True, streams=True,
               summary="RegMean on every lora_A and lora_B weight, each with its input Gram"),
    MethodInfo("regcl_product", RegclProductParams, needs_stats=True, streams=True,
               summary="RegMean on each product B @ A with the lora_A Gram, re-factored "
               "to the adapters' rank"),
    MethodInfo("mean", MeanParams, needs_stats=False, streams=True,
               summary="element-wise mean of every weight"),
    MethodInfo("task_arithmetic", TaskArithmeticParams, needs_stats=False, streams=True,
               summary="scale times the sum of every weight"),
    MethodInfo("ties", TiesParams, needs_stats=False, streams=False,
               summary="TIES-Merging: trim, elect sign, disjoint mean",
               why_not_streaming="TIES trims each adapter to its own top-density entries and "
               "elects every sign from all adapters at once, so its result cannot be computed "
               "from running sums; keep the adapters and call merge_adapters('ties', ...) "
               "instead"),
    MethodInfo("magmax", MagmaxParams, needs_stats=False, streams=True,
               summary="per element, the value of largest magnitude"),
    MethodInfo("core_space", CoreSpaceParams, needs_stats=False, streams=False,
               summary="Core Space merging (NeurIPS 2025): each LoRA pair projected on "
               "reference bases of all the adapters' factors, the small core matrices merged, "
               "re-factored to the adapters' rank",
               why_not_streaming="its reference bases are SVDs of every adapter's stacked "
               "factors, so it needs all the adapters at once; keep them and call "
               "merge_adapters('core_space', ...) instead"),
)}

STREAMING_METHODS: tuple[str, ...] = tuple(n for n, m in CATALOGUE.items() if m.streams)
"""Methods :class:`~regcl.merging.state.ContinualMergeState` (and so the service) folds."""
STATS_METHODS: tuple[str, ...] = tuple(n for n, m in CATALOGUE.items() if m.needs_stats)
"""Methods that need Gram statistics for every adapter."""


def method_info(name: object) -> MethodInfo:
    """The catalogue entry of ``name``; ConfigError listing the known methods otherwise."""
    info = CATALOGUE.get(name) if isinstance(name, str) else None
    if info is None:
        raise ConfigError(f"unknown merge method {name!r}; known methods: "
                          f"{', '.join(sorted(CATALOGUE))}")
    return info
