"""``regcl bench cl``: the RegCL paper's continual-learning protocol on the synthetic domains,
over several seeds, with intervals.

For each seed and domain order: zero-shot base, the individual adapters (upper bound),
sequential fine-tuning of one adapter, every merge method folding the per-domain adapters in
order, and ``auto`` (each test image routed by the data-free router to its domain's individual
adapter, or to the default merge when the router is not confident). Each run yields a continual
matrix ``M[i][j]`` (IoU on domain j of the model after step i), from which AA, FM and FT follow.
Individual adapters do not depend on the order, and every merge method is symmetric in its
domains, so both are computed once per seed / domain set and reused. A *sweep* scores more merge
variants on the final step only (all domains merged: no order, so one merge per seed).

The work runs as jobs (:mod:`regcl.bench.cl_worker`) in ``workers`` processes of ``threads``
torch threads each; a job's result does not depend on the process that ran it, so the numbers
do not depend on ``workers``. They do depend on ``threads`` (floating-point reductions split
differently), which the report records.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from regcl.bench.cl_assemble import assemble_report
from regcl.bench.cl_config import (
    BenchConfig,
    config_from_options,
    parse_spec,
)
from regcl.bench.cl_report import markdown_table
from regcl.bench.cl_worker import BenchWorker, execute, init_worker, run_indexed
from regcl.merging import STREAMING_METHODS, ContinualMergeState, merge_adapters
from regcl.routing import DomainRouter

logger = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]


def domain_orders(domains: Sequence[str], count: int) -> list[tuple[str, ...]]:
    """The paper's order first, then its reverse, then seeded shuffles (deterministic)."""
    orders = [tuple(domains)]
    if count > 1 and len(domains) > 1:
        orders.append(tuple(reversed(domains)))
    gen = torch.Generator().manual_seed(1234)
    attempts = 0
    while len(orders) < count and attempts < 1000:
        attempts += 1
        perm = tuple(domains[i] for i in torch.randperm(len(domains), generator=gen).tolist())
        if perm not in orders:
            orders.append(perm)
    return orders


class JobRunner:
    """Runs bench jobs in this process (``workers == 1``) or a pool of spawned processes."""

    def __init__(self, config: BenchConfig, say: Callable[[str], None],
                 local: BenchWorker | None = None) -> None:
        """local: the worker to run jobs in when ``workers == 1`` (default: a new one)."""
        self.config, self.say = config, say
        self._pool = None
        self._local: BenchWorker | None = local

    def __enter__(self) -> JobRunner:
        if self.config.workers > 1:
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.config.workers, initializer=init_worker,
                                      initargs=(self.config,))
        elif self._local is None:
            self._local = BenchWorker(self.config)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate() if exc[0] is not None else self._pool.close()
            self._pool.join()

    def map(self, jobs: Sequence[tuple], what: str) -> list[Any]:
        """Results of ``jobs`` in their order; the pool takes them longest-first as given."""
        t0, results = time.monotonic(), [None] * len(jobs)
        if self._local is not None:
            for i, job in enumerate(jobs):
                results[i] = execute(self._local, job)
        else:
            assert self._pool is not None
            for i, blob in self._pool.imap_unordered(run_indexed, list(enumerate(jobs))):
                results[i] = torch.load(io.BytesIO(blob), weights_only=True)
        self.say(f"{what}: {len(jobs)} jobs in {time.monotonic() - t0:.0f} s")
        return results


def merge_steps(spec: str, adapters: Sequence[Weights], stats: Sequence[Weights],
                names: Sequence[str]) -> list[Weights]:
    """The merge of the first 1..T adapters under ``spec``: folded step by step into a
    :class:`ContinualMergeState` when the method has one, else merged from scratch each step."""
    method, params = parse_spec(spec)
    if method in STREAMING_METHODS:
        state, out = ContinualMergeState(method, **params), []
        for adapter, stat, name in zip(adapters, stats, names):
            state.fold(adapter, stat, domain=name)
            out.append(state.merged())
        return out
    return [merge_adapters(method, adapters[: t + 1], stats[: t + 1], **params)
            for t in range(len(adapters))]


def run_cl_benchmark(config: BenchConfig, progress: Callable[[str], None] | None = None
                     ) -> dict:
    """Run the protocol; returns a JSON-ready dict (config, summaries, every matrix)."""
    say = progress or (lambda msg: logger.info("%s", msg))
    start = time.monotonic()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # the merges run here
    seeds, domains = config.seeds, config.domains
    orders = [] if config.final_only else domain_orders(domains, config.orders)
    cached_before = _count_cached(config, orders)
    try:
        with JobRunner(config, say) as runner:
            # 1. Individual adapters (with their statistics) and the base model.
            jobs = [("individual", s, d) for s in seeds for d in domains]
            out = runner.map(jobs + [("evaluate", s, None) for s in seeds], "individual adapters")
            individual = {(s, d): out[i] for i, (_, s, d) in enumerate(jobs)}
            base = dict(zip(seeds, out[len(jobs):]))
            # 2. Sequential fine-tuning chains, individual adapters scored, routing.
            chains = [("chain", s, o, individual[s, o[0]][0]) for s in seeds for o in orders]
            pairs = [(s, d) for s in seeds for d in domains]
            evals = [("evaluate", s, individual[s, d][0]) for s, d in pairs]
            routes = [("route", s, {d: individual[s, d][1] for d in domains}) for s in seeds]
            out = runner.map(chains + evals + routes, "sequential fine-tuning, routing")
            sequential = {(s, o): [individual[s, o[0]][0], *out[i]]
                          for i, (_, s, o, _) in enumerate(chains)}
            individual_scores = {pair: out[len(chains) + i] for i, pair in enumerate(pairs)}
            routing = dict(zip(seeds, out[len(chains) + len(evals):]))
            # 3. Merges (here: cheap and deterministic), each distinct one scored once.
            merged = _plan_merges(config, orders, individual)
            keys = list(merged)
            todo = [("evaluate", key[0], merged[key]) for key in keys]
            todo += [("evaluate", s, w) for (s, _), steps in sequential.items() for w in steps[1:]]
            out = runner.map(todo, "merges and sequential steps scored")
            merge_scores = dict(zip(keys, out))
            seq_scores = iter(out[len(keys):])
            sequential_scores = {key: [individual_scores[key[0], key[1][0]]]
                                 + [next(seq_scores) for _ in steps[1:]]
                                 for key, steps in sequential.items()}
    finally:
        torch.set_num_threads(threads_before)
    report = assemble_report(config, orders, base, individual_scores, sequential_scores,
                             merge_scores, routing)
    report["memory"] = memory_by_domains(config, individual)
    report["trained_from_cache"] = cached_before
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    report["machine"] = (f"{platform.machine()}, {config.workers} worker process(es) x "
                         f"{config.threads} torch thread(s), torch {torch.__version__}, "
                         f"Python {platform.python_version()}")
    return report


def memory_by_domains(config: BenchConfig, individual: dict) -> list[dict[str, int]]:
    """Bytes held after each step of the first sequence (first seed): the streaming merge
    states (constant), and what ``auto`` holds (every individual adapter plus the router)."""
    seed, order = config.seeds[0], config.domains
    states = {spec: ContinualMergeState(parse_spec(spec)[0], **parse_spec(spec)[1])
              for spec in dict.fromkeys(("regcl", config.default_method))
              if parse_spec(spec)[0] in STREAMING_METHODS}
    router = DomainRouter(config.route_ridge)
    rows, adapters = [], 0
    for t, domain in enumerate(order, start=1):
        weights, stats = individual[seed, domain]
        for state in states.values():
            state.fold(weights, stats, domain=domain)
        router.fold(domain, stats)
        adapters += sum(v.numel() * v.element_size() for v in weights.values())
        rows.append({"domains": t, **{f"state_bytes {spec}": state.nbytes()
                                      for spec, state in states.items()},
                     "auto_adapters_bytes": adapters, "auto_router_bytes": router.nbytes()})
    return rows


def _count_cached(config: BenchConfig, orders: Sequence[tuple[str, ...]]) -> int:
    """How many of this run's trainings the cache holds already (0 without a cache)."""
    if not config.cache_dir:
        return 0
    from regcl.bench.cl_worker import TrainedCache

    cache = TrainedCache(config)
    identities = [("individual", s, d) for s in config.seeds for d in config.domains]
    identities += [("sequential", s, o[:step]) for s in config.seeds for o in orders
                   for step in range(2, len(o) + 1)]
    return sum(cache.has(identity) for identity in identities)


def _plan_merges(config: BenchConfig, orders: Sequence[tuple[str, ...]],
                 individual: dict) -> dict[tuple, Weights]:
    """Every distinct merge to score: ``(seed, spec, frozenset(domains)) -> weights``."""
    merged: dict[tuple, Weights] = {}
    everything = tuple(config.domains)
    for s in config.seeds:
        for spec in dict.fromkeys((*config.methods, *config.sweep)):
            sequences = orders if spec in config.methods else []
            if spec in config.sweep or config.final_only:
                sequences = [*sequences, everything]
            for order in sequences:
                todo = [t for t in range(len(order))
                        if (s, spec, frozenset(order[: t + 1])) not in merged]
                if not todo:
                    continue
                adapters = [individual[s, d][0] for d in order[: todo[-1] + 1]]
                stats = [individual[s, d][1] for d in order[: todo[-1] + 1]]
                try:
                    steps = merge_steps(spec, adapters, stats, order[: todo[-1] + 1])
                except (ValueError, RuntimeError) as error:  # e.g. ridge 0: singular Gram sum
                    logger.warning("seed %d: %s failed: %s", s, spec, error)
                    continue
                for t in todo:
                    merged[s, spec, frozenset(order[: t + 1])] = steps[t]
    return merged


__all__ = ["BenchConfig", "config_from_options", "domain_orders", "markdown_table", "parse_spec",
           "run_cl_benchmark"]
