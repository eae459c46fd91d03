"""Validated parameters of each job kind (pydantic; no torch, so the API can import them).

Every model forbids unknown fields (a typo is an error, not a silently ignored option) and
bounds each number. :func:`validate` turns pydantic's ValidationError into
:class:`~regcl.errors.ConfigError` with one readable line per problem. The worker validates
again when it reads a job, so a job sent by other means gets the same checks.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from infra.datasets import validate_dataset_name
from infra.registry import validate_adapter_name
from regcl.errors import ConfigError

__all__ = [
    "STREAMING_METHODS",
    "ContinualParams",
    "EvaluateParams",
    "MergeJobParams",
    "StatsParams",
    "TrainParams",
    "method_params_type",
    "stats_output_name",
    "validate",
]

M = TypeVar("M", bound=BaseModel)

# regcl.merging.STREAMING_METHODS, repeated so that this module needs no torch (a test keeps
# them equal): only methods whose merge folds into running sums can be merged continually.
STREAMING_METHODS = ("regcl", "regcl_product", "mean", "task_arithmetic", "magmax")
MergeMethodName = Literal["regcl", "regcl_product", "mean", "task_arithmetic", "magmax"]
# The default merge. `regcl bench cl` (README; docs/bench-cl.json) scored the product variant
# above the paper's per-factor RegMean: AA 0.563 vs 0.532, forgetting 0.028 vs 0.043, over 3
# domain orders of the 5 synthetic domains with the tiny SAM. Re-check when the models change.
DEFAULT_MERGE_METHOD: MergeMethodName = "regcl_product"

Finite = Annotated[float, Field(allow_inf_nan=False)]
_FROZEN = ConfigDict(extra="forbid", frozen=True)


def validate(model: type[M], data: Any, what: str) -> M:
    """``model`` validated from ``data`` (None: all defaults); ConfigError when invalid."""
    try:
        return model.model_validate({} if data is None else data)
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

    adapter: str | None = None
    rank: int = Field(10, ge=1, le=256)
    alpha: Finite | None = Field(None, gt=0)
    blocks: list[int] | None = Field(None, min_length=1, max_length=128)
    epochs: int = Field(20, ge=1, le=1000)
    batch_size: int = Field(8, ge=1, le=256)
    lr: Finite = Field(5e-3, gt=0, le=1)
    min_lr: Finite = Field(1e-7, ge=0, le=1)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    n_points: int = Field(3, ge=1, le=64)
    holdout: Finite = Field(0.1, gt=0, le=0.5)
    max_samples: int | None = Field(None, ge=2, le=100_000)

    @field_validator("adapter")
    @classmethod
    def _adapter_name(cls, value: str | None) -> str | None:
        return None if value is None else _name(validate_adapter_name, value)

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> TrainParams:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self

    @field_validator("blocks")
    @classmethod
    def _unique_blocks(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if any(b < 0 for b in value) or len(set(value)) != len(value):
            raise ValueError("blocks must be distinct, non-negative encoder block indices")
        return sorted(value)


class RegclMethodParams(BaseModel):
    """``regcl`` / ``regcl_product``: relative ridge ≥ 0 and Gram off-diagonal shrink in
    [0, 1] (see :class:`regcl.merging.RegclParams`)."""

    model_config = _FROZEN

    ridge: Finite = Field(1e-4, ge=0)
    alpha: Finite = Field(1.0, ge=0, le=1)


class NoMethodParams(BaseModel):
    """``mean`` and ``magmax`` take no parameters."""

    model_config = _FROZEN


class TaskArithmeticMethodParams(BaseModel):
    """``task_arithmetic``: the factor on the sum of the task vectors."""

    model_config = _FROZEN

    scale: Finite = 1.0


_METHOD_PARAMS: dict[str, type[BaseModel]] = {
    "regcl": RegclMethodParams,
    "regcl_product": RegclMethodParams,
    "mean": NoMethodParams,
    "task_arithmetic": TaskArithmeticMethodParams,
    "magmax": NoMethodParams,
}


def method_params_type(method: str) -> type[BaseModel]:
    """The parameter model of merge ``method`` (ConfigError for other names)."""
    if method not in _METHOD_PARAMS:
        raise ConfigError(f"merge method {method!r} cannot be merged continually; use one of "
                          f"{', '.join(STREAMING_METHODS)}")
    return _METHOD_PARAMS[method]


class MergeJobParams(BaseModel):
    """A merge job: the adapters to fold into the latest version's merge state, in order.

    fresh: start from an empty state even if the latest version's method and parameters match.
    """

    model_config = _FROZEN

    adapters: list[str] = Field(min_length=1, max_length=64)
    method: MergeMethodName = DEFAULT_MERGE_METHOD
    params: dict[str, Any] = {}
    activate: bool = False
    fresh: bool = False

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: list[str]) -> list[str]:
        for name in value:
            _name(validate_adapter_name, name)
        if len(set(value)) != len(value):
            raise ValueError("adapters must not repeat a name")
        return value

    def method_params(self) -> dict[str, Any]:
        """``params`` validated for ``method``, with defaults filled in (ConfigError)."""
        model = validate(method_params_type(self.method), self.params,
                         f"parameters of merge method {self.method!r}")
        return model.model_dump()


class EvaluateParams(BaseModel):
    """Scoring a model on datasets with ``n_points`` fixed random positive points per object
    (the evaluation protocol of :func:`regcl.evaluation.evaluate.evaluate_points`)."""

    model_config = _FROZEN

    seed: int = Field(0, ge=0, le=2**31 - 1)
    n_points: int = Field(3, ge=1, le=64)
    max_samples: int | None = Field(512, ge=1, le=100_000)
    batch_size: int = Field(16, ge=1, le=256)


class StatsParams(BaseModel):
    """Computing Gram statistics for an adapter on a calibration dataset.

    output: name of the new adapter (default ``<adapter>-stats``). max_samples: calibration
    images used (a seeded random subset).
    """

    model_config = _FROZEN

    output: str | None = None
    max_samples: int = Field(64, ge=1, le=10_000)
    batch_size: int = Field(16, ge=1, le=256)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("output")
    @classmethod
    def _output_name(cls, value: str | None) -> str | None:
        return None if value is None else _name(validate_adapter_name, value)


def stats_output_name(adapter: str, params: StatsParams) -> str:
    """Where the stats job stores its result: ``params.output`` or ``<adapter>-stats``."""
    name = params.output or f"{adapter}-stats"
    try:
        validate_adapter_name(name)
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


def _name(check: Any, value: Any) -> str:
    try:
        return check(value)
    except ValueError as exc:  # InvalidName is a ValueError: pydantic reports it as a problem
        raise ValueError(str(exc)) from None


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
    seed: int = Field(0, ge=0, le=2**31 - 1)
    tolerance: Finite = Field(0.02, ge=0, le=1)
    method: MergeMethodName | None = None
    n_points: int = Field(3, ge=1, le=64)
    eval_samples: int = Field(256, ge=1, le=100_000)

    @field_validator("train")
    @classmethod
    def _no_adapter_name(cls, value: TrainParams) -> TrainParams:
        if value.adapter is not None:
            raise ValueError("the step names its adapter (<domain>-s<n>); leave train.adapter "
                             "unset")
        return value
