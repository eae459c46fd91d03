"""The configuration of ``regcl bench cl``: :class:`BenchConfig`, merge specs, and the
configuration from command-line options. The runner (:mod:`regcl.bench.cl`), its jobs
(:mod:`regcl.bench.cl_worker`) and the report (:mod:`regcl.bench.cl_assemble`) all read it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from regcl.adapters.config import AdapterConfig
from regcl.data.domains import LONG_ORDER, PAPER_ORDER
from regcl.errors import ConfigError
from regcl.merging import get_merge_method, make_params
from regcl.routing import DEFAULT_MAX_NOVELTY, DEFAULT_MIN_MARGIN
from regcl.training.adapter import TrainConfig

__all__ = ["DEFAULT_BENCH_MERGE", "MERGE_METHODS_BENCHED", "MERGE_SWEEP", "BenchConfig",
           "config_from_options", "config_json", "parse_spec"]

MERGE_METHODS_BENCHED = ("regcl", "regcl_product", "mean", "task_arithmetic", "ties", "magmax",
                         "core_space")
DEFAULT_BENCH_MERGE = "regcl_product"
"""The service's default merge (workers/params.py), which ``auto`` falls back to."""
MERGE_SWEEP = (
    "regcl", "regcl:ridge=1e-06", "regcl:ridge=1e-08", "regcl:ridge=0", "regcl:weighting=trace",
    "regcl_product", "regcl_product:ridge=1e-05", "regcl_product:ridge=1e-06",
    "regcl_product:ridge=1e-07", "regcl_product:ridge=1e-08", "regcl_product:ridge=1e-10",
    "regcl_product:ridge=1e-12", "regcl_product:ridge=0", "regcl_product:weighting=tokens",
    "regcl_product:weighting=trace", "core_space", "core_space:inner=mean",
    "core_space:inner=task_arithmetic", "core_space:inner=iso",
)
"""Merge variants scored on the final step (``--sweep``): ridges down to the solver's limit,
Gram weightings, Core Space merging with its inner methods."""

@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. Merge methods are *specs*: ``name`` or ``name:key=value,...``
    (``regcl_product:ridge=1e-06``), each the row ``merge: <spec>``."""

    domains: tuple[str, ...] = PAPER_ORDER
    orders: int = 3
    seeds: tuple[int, ...] = (0,)
    train_per_domain: int = 128
    test_per_domain: int = 64
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: tuple[str, ...] = MERGE_METHODS_BENCHED
    default_method: str = DEFAULT_BENCH_MERGE
    sweep: tuple[str, ...] = ()
    route_ridge: float = 1e-4
    route_min_margin: float = DEFAULT_MIN_MARGIN
    route_max_novelty: float = DEFAULT_MAX_NOVELTY
    route_probes: tuple[str, ...] = ("source",)
    final_only: bool = False
    threads: int = 1
    workers: int = 1
    checkpoint: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"domains must be distinct and non-empty, got {self.domains}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"seeds must be distinct and >= 0, got {self.seeds}")
        if self.threads < 1 or self.workers < 1 or self.orders < 1:
            raise ConfigError("threads, workers and orders must be >= 1")
        for spec in (*self.methods, self.default_method, *self.sweep):
            parse_spec(spec)
        if self.default_method not in self.methods:
            raise ConfigError(f"the default merge {self.default_method!r} must be one of the "
                              f"methods benched ({', '.join(self.methods)})")

    @classmethod
    def quick(cls) -> BenchConfig:
        """A smoke run of a few minutes: 3 domains, few images, two epochs."""
        return cls(domains=PAPER_ORDER[:3], train_per_domain=16, test_per_domain=16,
                   train=TrainConfig(epochs=2))


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> (name, params), numbers as floats (ConfigError)."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"merge spec {spec!r}: expected key=value, got {item!r}")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            params[key.strip()] = value.strip()
    get_merge_method(name)  # ConfigError for unknown names
    make_params(name, **params)  # ConfigError for bad parameters
    return name, params


def config_from_options(*, quick: bool = False, base: BenchConfig | None = None,
                        domains: str | None = None,
                        seeds: int | None = None, first_seed: int | None = None,
                        methods: Sequence[str] | None = None, probes: str | None = None,
                        sweep: bool = False, epochs: int | None = None,
                        interactive_rounds: int | None = None,
                        **options: Any) -> BenchConfig:
    """A config from command-line style options (None: keep the default, which is ``base``'s,
    else the quick or the full :class:`BenchConfig`'s).

    domains: comma-separated names, or ``long`` for :data:`~regcl.data.domains.LONG_ORDER`;
    seeds: K, meaning seeds first_seed..first_seed+K−1; methods: merge specs; probes:
    comma-separated domains; sweep: add :data:`MERGE_SWEEP`; epochs: training epochs;
    interactive_rounds: the adapters' interactive training rounds; other options (orders,
    workers, threads, ...) set as given.
    """
    config = base or (BenchConfig.quick() if quick else BenchConfig())
    changes: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    if domains:
        names = LONG_ORDER if domains == "long" else tuple(
            d.strip() for d in domains.split(",") if d.strip())
        changes["domains"] = names
    if seeds is not None or first_seed is not None:
        first = first_seed or 0
        count = len(config.seeds) if seeds is None else seeds
        changes["seeds"] = tuple(range(first, first + count))
    if probes:
        changes["route_probes"] = tuple(d.strip() for d in probes.split(",") if d.strip())
    if methods:
        changes["methods"] = tuple(methods)
    if sweep:
        changes["sweep"] = MERGE_SWEEP
    train: dict[str, Any] = {"epochs": epochs, "interactive_rounds": interactive_rounds}
    if any(v is not None for v in train.values()):
        changes["train"] = dataclasses.replace(
            config.train, **{k: v for k, v in train.items() if v is not None})
    return dataclasses.replace(config, **changes)


def config_json(config: BenchConfig) -> dict:
    """The config as JSON-ready data."""
    data = asdict(config)
    data["adapter"] = asdict(config.adapter)
    data["train"] = asdict(config.train)
    return data
