"""Validated parameters of each job kind (pydantic; no torch, so the API can import them).

Every model forbids unknown fields (a typo is an error, not a silently ignored option) and
bounds each number; the HTTP API publishes these models as its request schemas. The merge
methods, their parameters and bounds come from :mod:`regcl.merging.catalogue` (one model per
streaming method, made from its parameter dataclass). :func:`validate` turns pydantic's
ValidationError into :class:`~regcl.errors.ConfigError` with one readable line per problem.
The worker validates again when it reads a job, so a job sent by other means gets the same
checks.
"""

from __future__ import annotations

import functools
import math
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
)

from infra.datasets import validate_dataset_name
from infra.names import name_schema, validate_name
from regcl.errors import ConfigError
from regcl.merging.catalogue import (
    CATALOGUE,
    STREAMING_METHODS,
    Choice,
    MethodInfo,
    parameter_bounds,
)

__all__ = [
    "METHOD_PARAMS",
    "STATS_SUFFIX",
    "ContinualParams",
    "EvaluateParams",
    "Integer",
    "MergeJob",
    "MergeJobParams",
    "StatsParams",
    "TrainParams",
    "integer",
    "method_params_type",
    "stats_output_name",
    "validate",
]

M = TypeVar("M", bound=BaseModel)

# The default merge (of the catalogue's streaming methods: only those can be merged
# continually). `regcl bench cl` (README; docs/bench-cl.json, 3 seeds, stage-4 tiny SAM) scores
# the product variant above the paper's per-factor RegMean by mean (AA 0.563 vs 0.550), but the
# paired interval (+0.014 ± 0.035) is not clear of zero, and no swept variant (ridge, Gram
# weighting, core_space) beats it clearly. Re-check when the models change.
DEFAULT_MERGE_METHOD = "regcl_product"

Finite = Annotated[float, Field(allow_inf_nan=False)]


def _whole(value: Any) -> Any:
    """JSON Schema's integers include 2.0: take a float without a fraction as its int."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(_whole)]
"""An integer field (the models are strict: no strings or booleans for numbers)."""


def integer(**bounds: int) -> Any:
    """:data:`Integer` within ``bounds`` (``ge``, ``le``), for use inside a list or union (the
    bounds must come before the validator for the schema to show them)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole)]
_FROZEN = ConfigDict(extra="forbid", frozen=True, strict=True)


@functools.cache
def _adapter_of(model: Any) -> TypeAdapter[Any]:
    return TypeAdapter(model)


def validate(model: type[M] | Any, data: Any, what: str) -> M:
    """``model`` (a model class or an annotated union of them) validated from ``data`` (None:
    all defaults); ConfigError when invalid."""
    try:
        return _adapter_of(model).validate_python({} if data is None else data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
            for err in exc.errors())
        raise ConfigError(f"invalid {what}: {problems}") from None


class TrainParams(BaseModel):
    """Training one domain adapter (defaults: the RegCL paper's recipe, rank 10).

    adapter: name to register the result under (default: the domain). holdout: fraction of
    the dataset kept out of training to score the adapter on. max_samples: use at most this
    many samples (a seeded random subset).
    """

    model_config = _FROZEN

    adapter: str | None = Field(None, json_schema_extra=name_schema(new=True))
    rank: Integer = Field(10, ge=1, le=256)
    alpha: Finite | None = Field(None, gt=0)
    blocks: list[integer(ge=0)] | None = Field(  # type: ignore[valid-type]
        None, min_length=1, max_length=128, json_schema_extra={"uniqueItems": True})
    epochs: Integer = Field(20, ge=1, le=1000)
    batch_size: Integer = Field(8, ge=1, le=256)
    lr: Finite = Field(5e-3, gt=0, le=1)
    min_lr: Finite = Field(1e-7, ge=0, le=1, description="The rate the cosine schedule "
                           "ends at (normally below lr; above it, the rate rises to it).")
    seed: Integer = Field(0, ge=0, le=2**31 - 1, description="Seeds the adapter's initial "
                          "weights, the holdout split and subset, the batches and the prompts: "
                          "the same job on the same data gives the same adapter.")
    n_points: Integer = Field(3, ge=1, le=64)
    interactive_rounds: Integer = Field(
        0, ge=0, le=32, description="SAM's interactive training: after the n_points "
        "prompt, this many clicks drawn from the error region with the previous mask's logits "
        "fed back, loss on every round (0: the paper's recipe, the first prompt alone).")
    points_only: Finite = Field(0.2, ge=0, le=1, description="With interactive_rounds: "
                                "share of training episodes that feed no mask back.")
    holdout: Finite = Field(0.1, gt=0, le=0.5)
    max_samples: integer(ge=2, le=100_000) | None = None  # type: ignore[valid-type]

    @field_validator("adapter")
    @classmethod
    def _adapter_name(cls, value: str | None) -> str | None:
        return None if value is None else _checked_adapter_name(value, new=True)

    @field_validator("blocks")
    @classmethod
    def _unique_blocks(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if any(b < 0 for b in value) or len(set(value)) != len(value):
            raise ValueError("blocks must be distinct, non-negative encoder block indices")
        return sorted(value)


def _method_params_model(info: MethodInfo) -> type[BaseModel]:
    """The pydantic twin of ``info.params_type``: its fields, defaults and bounds (a
    :class:`~regcl.merging.catalogue.Choice` becomes a Literal of its options)."""
    fields: dict[str, Any] = {}
    for name, (bound, default, doc) in parameter_bounds(info.params_type).items():
        if isinstance(bound, Choice):
            fields[name] = (Literal[bound.options], Field(default, description=doc))
            continue
        limits: dict[str, float] = {}
        if math.isfinite(bound.low):
            limits["gt" if bound.low_open else "ge"] = bound.low
        if math.isfinite(bound.high):
            limits["le"] = bound.high
        fields[name] = (Finite, Field(default, description=doc, **limits))
    return create_model(f"{_camel(info.name)}MethodParams", __config__=_FROZEN,
                        __doc__=f"Parameters of merge method ``{info.name}``.", **fields)


def _camel(name: str) -> str:
    return "".join(part.title() for part in name.split("_"))


METHOD_PARAMS: dict[str, type[BaseModel]] = {
    name: _method_params_model(CATALOGUE[name]) for name in STREAMING_METHODS}
"""The parameter model of each streaming merge method."""


def method_params_type(method: str) -> type[BaseModel]:
    """The parameter model of merge ``method`` (ConfigError for other names)."""
    if method not in METHOD_PARAMS:
        raise ConfigError(f"merge method {method!r} cannot be merged continually; use one of "
                          f"{', '.join(STREAMING_METHODS)}")
    return METHOD_PARAMS[method]


class MergeJob(BaseModel):
    """A merge job: the adapters to fold into the latest version's merge state, in order.

    fresh: start from an empty state even if the latest version's method and parameters match.
    One subclass per streaming method fixes ``method`` and types ``params``.
    """

    model_config = _FROZEN

    adapters: list[Annotated[str, Field(json_schema_extra=name_schema())]] = Field(
        min_length=1, max_length=64, json_schema_extra={"uniqueItems": True})
    method: str
    params: BaseModel | None = None
    activate: bool = False
    fresh: bool = False

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: list[str]) -> list[str]:
        for name in value:
            _checked_adapter_name(name)
        if len(set(value)) != len(value):
            raise ValueError("adapters must not repeat a name")
        return value

    def method_params(self) -> dict[str, Any]:
        """The method's parameters, with defaults filled in (none given: all defaults)."""
        params = self.params if self.params is not None else METHOD_PARAMS[self.method]()
        return params.model_dump()


def _merge_job_model(method: str) -> Any:
    params = METHOD_PARAMS[method]
    default = method if method == DEFAULT_MERGE_METHOD else ...
    model = create_model(f"{_camel(method)}MergeJob", __base__=MergeJob,
                         __doc__=f"A merge job with method ``{method}`` "
                         f"({CATALOGUE[method].summary}).",
                         method=(Literal[method], Field(default)),  # type: ignore[valid-type]
                         params=(params | None, Field(None)))
    return Annotated[model, Tag(method)]


def _method_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("method", DEFAULT_MERGE_METHOD)
    return getattr(value, "method", None)


MergeJobParams = Annotated[
    Union[tuple(_merge_job_model(m) for m in STREAMING_METHODS)],  # noqa: UP007
    Discriminator(_method_tag, custom_error_type="invalid_merge_method",
                  custom_error_message="method must be one of "
                  + ", ".join(STREAMING_METHODS))]
"""A merge job of one streaming method (validate with :func:`validate`); the default method
is :data:`DEFAULT_MERGE_METHOD`."""


class EvaluateParams(BaseModel):
    """Scoring a model on datasets with ``n_points`` fixed random positive points per object
    (the evaluation protocol of :func:`regcl.evaluation.evaluate.evaluate_points`), and with
    the click protocol (:mod:`regcl.evaluation.clicks`: IoU after 1/3/5/10 clicks, NoC@80/85/90
    capped at ``clicks``)."""

    model_config = _FROZEN

    seed: Integer = Field(0, ge=0, le=2**31 - 1)
    n_points: Integer = Field(3, ge=1, le=64)
    clicks: Integer = Field(20, ge=0, le=100, description="Click protocol: most clicks per "
                            "object, the NoC cap (0: skip the click protocol).")
    click_feedback: bool = Field(True, description="Click protocol: feed the previous "
                                 "mask's low-res logits back (else points only).")
    max_samples: integer(ge=1, le=100_000) | None = 512  # type: ignore[valid-type]
    batch_size: Integer = Field(16, ge=1, le=256)


class StatsParams(BaseModel):
    """Computing Gram statistics for an adapter on a calibration dataset.

    output: name of the new adapter (default ``<adapter>-stats``). max_samples: calibration
    images used (a seeded random subset).
    """

    model_config = _FROZEN

    output: str | None = Field(None, json_schema_extra=name_schema(new=True))
    max_samples: Integer = Field(64, ge=1, le=10_000)
    batch_size: Integer = Field(16, ge=1, le=256)
    seed: Integer = Field(0, ge=0, le=2**31 - 1)

    @field_validator("output")
    @classmethod
    def _output_name(cls, value: str | None) -> str | None:
        return None if value is None else _checked_adapter_name(value, new=True)


STATS_SUFFIX = "-stats"
"""A stats job's result is ``<adapter>-stats`` unless it is given a name."""


def stats_output_name(adapter: str, params: StatsParams) -> str:
    """Where the stats job stores its result: ``params.output`` or ``<adapter>-stats``."""
    name = params.output or adapter + STATS_SUFFIX
    try:
        validate_name(name, "adapter name", new=True)
    except ValueError as exc:
        raise ConfigError(f"{exc}; pass an explicit output name") from None
    if name == adapter:
        raise ConfigError("the output adapter must have a new name: adapters are immutable")
    return name


def check_dataset_names(names: list[str]) -> list[str]:
    """``names`` if each is a valid dataset name and none repeats (ConfigError otherwise)."""
    if not isinstance(names, list | tuple) or not 1 <= len(names) <= 16:
        raise ConfigError("datasets must be a list of 1 to 16 dataset names")
    for name in names:
        try:
            validate_dataset_name(name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if len(set(names)) != len(names):
        raise ConfigError("datasets must not repeat a name")
    return list(names)


def _checked_adapter_name(value: Any, *, new: bool = False) -> str:
    try:
        return validate_name(value, "adapter name", new=new)
    except ValueError as exc:  # InvalidName is a ValueError: pydantic reports it as a problem
        raise ValueError(str(exc)) from None


MergeMethodName = Literal[STREAMING_METHODS]  # type: ignore[valid-type]
"""The name of a merge method that can be merged continually (the catalogue's streaming ones)."""


class ContinualParams(BaseModel):
    """A continual step of one domain's sample set (a Label Studio project): snapshot it,
    train the domain's adapter, merge it into the live version as a candidate, and activate
    that candidate only if it passes the gate (:mod:`regcl.evaluation.gate`).

    train: the adapter's training (its ``adapter`` name is chosen by the step, its
    ``holdout`` unused: the snapshot's held-out split is). holdout: fraction of the tasks held
    out (split by a seeded hash of the task id). tolerance: the most IoU the candidate may
    lose on another domain. method: the merge (default: the live version's, else
    DEFAULT_MERGE_METHOD). eval_samples: held-out samples scored per domain at most.
    """

    model_config = _FROZEN

    train: TrainParams = TrainParams()
    holdout: Finite = Field(0.25, gt=0, lt=1)
    seed: Integer = Field(0, ge=0, le=2**31 - 1)
    tolerance: Finite = Field(0.02, ge=0, le=1)
    method: MergeMethodName | None = None
    n_points: Integer = Field(3, ge=1, le=64)
    eval_samples: Integer = Field(256, ge=1, le=100_000)

    @field_validator("train")
    @classmethod
    def _no_adapter_name(cls, value: TrainParams) -> TrainParams:
        if value.adapter is not None:
            raise ValueError("the step names its adapter (<domain>-s<n>); leave train.adapter "
                             "unset")
        return value
