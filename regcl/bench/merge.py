"""``regcl bench merge``: the cost of continual merging as the number of domains grows.

RegCL's claim is that folding a new domain into the merge costs the same, and the merge state
takes the same memory, whether 1 or 50 domains came before. This benchmark checks that claim
without building any model: it generates random adapter weights and Gram statistics with the
exact keys and shapes PEFT gives for each SAM variant (LoRA on ``qkv`` of
:func:`~regcl.adapters.config.default_blocks`; ``lora_A`` r x embed, ``lora_B`` 3·embed x r;
Grams embed x embed for ``lora_A`` and r x r for ``lora_B``), then for each model × method ×
number of domains T times

- *fold*: folding the T-th domain into a :class:`ContinualMergeState` already holding T−1;
- *solve*: :meth:`ContinualMergeState.merged` on the T-domain state.

The state holding T−1 domains is built cheaply: one domain is folded for real, its running sums
are scaled by T−1 and the state is rebuilt with :meth:`ContinualMergeState.from_tensors` under
T−1 domain names, which is exactly the state of folding that same adapter T−1 times.

Memory: ``state_bytes`` is :meth:`ContinualMergeState.nbytes` (the running sums, measured).
``peak_bytes`` is an accounting of the tensors alive during fold + solve, not a measurement
(tracemalloc does not see torch's allocator): the state, plus one domain's float64 fold terms
(same shapes as the sums, so equal to ``state_bytes``), plus the merged adapter returned by the
solve (measured). Solver workspace (LAPACK, the SVD of ``regcl_product``) is not included.

Methods without a streaming state (``core_space``, ``ties``) keep every adapter: for them
``state_bytes`` is the T adapters kept (no statistics: neither reads them), and *solve* merges
all T at once.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Sequence

import torch

from regcl.adapters.config import default_blocks
from regcl.adapters.layout import count_key, gram_key
from regcl.merging import (
    STREAMING_METHODS,
    ContinualMergeState,
    get_merge_method,
    merge_adapters,
)
from regcl.models.build import SAM_SPECS

logger = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]
_PREFIX = "base_model.model.image_encoder.blocks"
_GRAM_SAMPLES = 64  # rows of the random X behind each Gram X^T X / n (plus a small ridge)


def synthetic_adapter(model: str, rank: int = 10, seed: int = 0) -> tuple[Weights, Weights]:
    """Random ``(weights, stats)`` with the keys and shapes PEFT gives ``model`` (float32)."""
    if model not in SAM_SPECS:
        raise ValueError(f"unknown model {model!r}; known: {sorted(SAM_SPECS)}")
    spec = SAM_SPECS[model]
    embed = spec.encoder_embed_dim
    gen = torch.Generator().manual_seed(seed)
    weights: Weights = {}
    stats: Weights = {}
    for block in default_blocks(spec.encoder_depth):
        base = f"{_PREFIX}.{block}.attn.qkv"
        a_key, b_key = f"{base}.lora_A.weight", f"{base}.lora_B.weight"
        weights[a_key] = torch.randn(rank, embed, generator=gen) / embed**0.5
        weights[b_key] = torch.randn(3 * embed, rank, generator=gen) * 0.01
        for key, dim in ((a_key, embed), (b_key, rank)):
            x = torch.randn(_GRAM_SAMPLES, dim, generator=gen)
            gram = x.T @ x / _GRAM_SAMPLES + 0.01 * torch.eye(dim)
            stats[gram_key(key)] = gram
            stats[count_key(key)] = torch.tensor(1000, dtype=torch.int64)
    return weights, stats


def _state_with(method: str, base: ContinualMergeState, count: int) -> ContinualMergeState:
    """A state equal to folding ``base``'s single adapter ``count`` times (count ≥ 1)."""
    tensors, metadata = base.to_tensors()
    for tensor in tensors.values():
        tensor.mul_(count)
    (meta_key, raw), = metadata.items()
    header = json.loads(raw)
    header["domains"] = [f"domain-{i}" for i in range(count)]
    state = ContinualMergeState.from_tensors(tensors, {meta_key: json.dumps(header)})
    assert state.method == method and state.num_domains == count
    return state


def _tensor_bytes(tensors: Weights) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def bench_one(model: str, method: str, domains: Sequence[int], rank: int = 10, seed: int = 0,
              progress: Callable[[str], None] | None = None) -> list[dict]:
    """Rows for one model × method: fold and solve time and memory at each domain count."""
    say = progress or (lambda msg: logger.info("%s", msg))
    old = synthetic_adapter(model, rank, seed)
    new = synthetic_adapter(model, rank, seed + 1)
    if method not in STREAMING_METHODS:
        return _bench_kept(model, method, domains, old, new, say)
    base = ContinualMergeState(method)
    base.fold(*old, domain="domain-0")
    rows = []
    for count in domains:
        if count < 1:
            raise ValueError(f"domain counts must be >= 1, got {count}")
        state = _state_with(method, base, count - 1) if count > 1 else ContinualMergeState(method)
        t0 = time.perf_counter()
        state.fold(*new, domain=f"domain-new-{count}")
        t1 = time.perf_counter()
        merged = state.merged()
        t2 = time.perf_counter()
        state_bytes = state.nbytes()
        merged_bytes = _tensor_bytes(merged)
        row = {
            "model": model,
            "method": method,
            "domains": count,
            "fold_ms": (t1 - t0) * 1e3,
            "solve_ms": (t2 - t1) * 1e3,
            "state_bytes": state_bytes,
            "merged_bytes": merged_bytes,
            "peak_bytes": 2 * state_bytes + merged_bytes,
            "adapter_bytes": _tensor_bytes(new[0]),
            "stats_bytes": _tensor_bytes(new[1]),
        }
        rows.append(row)
        say(f"{model} {method} T={count}: fold {row['fold_ms']:.1f} ms, "
            f"solve {row['solve_ms']:.1f} ms, state {state_bytes / 2**20:.1f} MB")
        del state, merged
    return rows


def _bench_kept(model: str, method: str, domains: Sequence[int], old: tuple[Weights, Weights],
                new: tuple[Weights, Weights], say: Callable[[str], None]) -> list[dict]:
    """A method without a streaming state (e.g. ``core_space``, ``ties``): it keeps every
    adapter (``state_bytes`` = T adapters, and their statistics if the method reads them,
    growing with T) and merges
    them all at each new domain (``solve_ms``); there is no fold (``fold_ms`` 0)."""
    rows = []
    for count in domains:
        if count < 1:
            raise ValueError(f"domain counts must be >= 1, got {count}")
        adapters = [old[0]] * (count - 1) + [new[0]]
        stats = [old[1]] * (count - 1) + [new[1]]
        t0 = time.perf_counter()
        merged = merge_adapters(method, adapters, stats)
        solve = time.perf_counter() - t0
        needs = get_merge_method(method).needs_stats
        kept = count * (_tensor_bytes(new[0]) + (_tensor_bytes(new[1]) if needs else 0))
        row = {"model": model, "method": method, "domains": count, "fold_ms": 0.0,
               "solve_ms": solve * 1e3, "state_bytes": kept, "merged_bytes": _tensor_bytes(merged),
               "peak_bytes": kept + _tensor_bytes(merged), "adapter_bytes": _tensor_bytes(new[0]),
               "stats_bytes": _tensor_bytes(new[1])}
        rows.append(row)
        say(f"{model} {method} T={count}: solve {row['solve_ms']:.1f} ms, "
            f"kept {kept / 2**20:.1f} MB")
    return rows


def run_merge_benchmark(models: Sequence[str] = ("tiny", "vit_b", "vit_h"),
                        domains: Sequence[int] = (1, 2, 5, 10, 20, 50),
                        methods: Sequence[str] = ("regcl", "regcl_product"),
                        rank: int = 10, seed: int = 0,
                        progress: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark; returns a JSON-ready dict of rows and machine info."""
    start = time.monotonic()
    rows: list[dict] = []
    for model in models:
        for method in methods:
            rows.extend(bench_one(model, method, domains, rank, seed, progress))
    return {
        "config": {"models": list(models), "domains": list(domains), "methods": list(methods),
                   "rank": rank, "seed": seed},
        "rows": rows,
        "elapsed_s": round(time.monotonic() - start, 1),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "memory_note": "state_bytes: ContinualMergeState.nbytes() (measured); peak_bytes: "
                       "state + one domain's fold terms (= state) + merged adapter, an "
                       "accounting of live tensors, not a measurement; solver workspace excluded",
    }


def merge_markdown(report: dict) -> str:
    """One row per model × method × domain count: fold ms, solve ms, state MB."""
    lines = ["| model | method | domains | fold ms | solve ms | state MB |",
             "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['model']} | {row['method']} | {row['domains']} "
                     f"| {row['fold_ms']:.1f} | {row['solve_ms']:.1f} "
                     f"| {row['state_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


__all__ = ["bench_one", "merge_markdown", "run_merge_benchmark", "synthetic_adapter"]
