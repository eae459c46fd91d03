"""``regcl bench auto-memory``: what ``adapter: "auto"`` holds per domain, against the merge.

For each model shape (no weights are loaded: the architecture is built on the ``meta`` device,
and the router is fed random positive-definite Grams of the right width) it prints:

- the domain adapter (the default LoRA: rank 10, the paper's blocks), as PEFT stores it and
  as a serving slot holds it (float32);
- its statistics file in the registry (a Gram, a mean and a count per LoRA linear);
- the router's share in the API process, measured on routers with 1 and 5 domains: the served
  :class:`~regcl.routing.compact.CompactRouter` (per domain a K x K covariance and two
  D-vectors, plus a shared D x D whitening), and for comparison the full Gaussian
  :class:`~regcl.routing.DomainRouter` it replaced (the Gram and mean it stores plus the
  float64 precision matrix and terms it caches);
- the merge's live adapter for comparison: one adapter, whatever the number of domains.

Auto's memory grows by (adapter + router share) per domain (the adapter only while loaded:
at most ``REGCL_MAX_DOMAIN_ADAPTERS``) plus the router's shared whitening once; the merge
serves one adapter.
"""

from __future__ import annotations

import torch

from regcl.adapters import AdapterConfig, attach_lora
from regcl.models.build import SAM_SPECS, build_sam_from_spec
from regcl.routing import CompactRouter, DomainMoments, DomainRouter

__all__ = ["measure", "run"]

MODELS = ("tiny", "vit_b")


def _router_bytes(dim: int, domains: int) -> int:
    """Stored statistics plus the cached scoring factors of a router over ``domains``."""
    gen = torch.Generator().manual_seed(0)
    router = DomainRouter()
    for t in range(domains):
        x = torch.randn(4 * dim, dim, generator=gen)
        router.fold_moments(f"d{t}", x.T @ x / x.shape[0], x.shape[0], x.mean(0))
    eye = torch.eye(dim, dtype=torch.float64)
    router.score_moments(eye[None], torch.zeros(1, dim, dtype=torch.float64))
    cached = sum(t.numel() * t.element_size() for t in router._prepared())
    return router.nbytes() + cached


def _compact_bytes(dim: int) -> tuple[int, int]:
    """(bytes per domain, shared bytes) of the served router at width ``dim``."""
    gen = torch.Generator().manual_seed(0)
    moments = {}
    for t in range(3):
        x = torch.randn(4 * dim, dim, generator=gen, dtype=torch.float64)
        moments[f"d{t}"] = DomainMoments(x.T @ x / x.shape[0], x.shape[0], x.mean(0))
    router = CompactRouter.build(moments)
    return router.domain_nbytes(), router.shared_nbytes()


def measure(model: str) -> dict[str, int]:
    """Bytes per domain of ``model``'s default adapter, its statistics and the router."""
    with torch.device("meta"):
        peft_model = attach_lora(build_sam_from_spec(SAM_SPECS[model]), AdapterConfig())
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    adapter = sum(p.numel() * 4 for p in lora.values())
    stats = sum((p.shape[1] ** 2 + p.shape[1]) * 4 + 8 for p in lora.values())
    dim = SAM_SPECS[model].encoder_embed_dim
    one, five = _router_bytes(dim, 1), _router_bytes(dim, 5)
    per, shared = _compact_bytes(dim)
    return {"dim": dim, "adapter_bytes": adapter, "stats_file_bytes": stats,
            "router_bytes_per_domain": per, "router_shared_bytes": shared,
            "full_router_bytes_per_domain": (five - one) // 4,
            "full_router_bytes_one_domain": one}


def run(models: tuple[str, ...] = MODELS) -> str:
    """The table, as markdown."""
    unknown = sorted(set(models) - set(SAM_SPECS))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {', '.join(sorted(SAM_SPECS))}")
    lines = ["| model | D | adapter (serving slot) | statistics file | router per domain | "
             "router, shared | full Gaussian router per domain (before) | auto per loaded "
             "domain | merge (live adapter, any number of domains) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        m = measure(model)
        per = m["adapter_bytes"] + m["router_bytes_per_domain"]
        lines.append(f"| {model} | {m['dim']} | {_size(m['adapter_bytes'])} | "
                     f"{_size(m['stats_file_bytes'])} | {_size(m['router_bytes_per_domain'])} | "
                     f"{_size(m['router_shared_bytes'])} | "
                     f"{_size(m['full_router_bytes_per_domain'])} | {_size(per)} | "
                     f"{_size(m['adapter_bytes'])} |")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB ({n:,} B)" if n >= 2**20 else f"{n / 2**10:.1f} KiB ({n:,} B)"


