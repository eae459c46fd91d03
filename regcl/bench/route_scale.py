"""The router's cost against the number of domains, at vit_b's width (D = 768), on synthetic
statistics: bytes per domain, build time, time to score one image, and accuracy on images
drawn from the synthetic domains themselves (part of ``regcl bench route``).

Domain t is a Gaussian N(μ_t, B + V_t V_tᵀ): a shared covariance B with a decaying spectrum
(like real token covariances) plus 8 random directions of its own, and a mean of its own; an
image is 256 tokens drawn from one domain. The full router
(:class:`~regcl.routing.DomainRouter`) holds a float32 Gram and a cached float64 precision per
domain, so it is run up to ``full_limit`` domains only (1,000 would need 7 GB); the compact
router (:class:`~regcl.routing.compact.CompactRouter`) reads the domains lazily, three passes
of one domain at a time.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from regcl.routing import DomainRouter
from regcl.routing.compact import CompactRouter, DomainMoments

__all__ = ["run_route_scale", "scale_text"]

DIM = 768  # vit_b
OWN = 8  # directions of its own per synthetic domain
TOKENS = 256


class _Synthetic:
    def __init__(self, dim: int = DIM) -> None:
        gen = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        spectrum = 1.0 / (1 + torch.arange(dim, dtype=torch.float64)) ** 0.8
        self.base_root = q * spectrum.sqrt()  # B = root rootᵀ
        self.base = self.base_root @ self.base_root.T
        self.dim = dim

    def domain(self, index: int) -> tuple[Tensor, Tensor]:
        """(mean D, own directions D x OWN) of domain ``index``."""
        gen = torch.Generator().manual_seed(10_000 + index)
        mean = torch.randn(self.dim, generator=gen, dtype=torch.float64) * 0.1
        own = torch.randn(self.dim, OWN, generator=gen, dtype=torch.float64) * 0.1
        return mean, own

    def moments(self, index: int) -> DomainMoments:
        mean, own = self.domain(index)
        cov = self.base + own @ own.T
        return DomainMoments(cov + torch.outer(mean, mean), 100 * TOKENS, mean)

    def image(self, index: int, seed: int) -> tuple[Tensor, Tensor]:
        """Moments (second 1 x D x D, first 1 x D) of one image of domain ``index``."""
        mean, own = self.domain(index)
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(TOKENS, self.dim, generator=gen, dtype=torch.float64)
        w = torch.randn(TOKENS, OWN, generator=gen, dtype=torch.float64)
        x = mean + z @ self.base_root.T + w @ own.T
        return (x.T @ x / TOKENS)[None], x.mean(0)[None]


def _full_bytes(dim: int) -> int:
    """The full router's bytes per domain: float32 Gram and mean stored, float64 precision,
    its product with the mean and two scalars cached."""
    return dim * dim * 4 + dim * 4 + dim * dim * 8 + dim * 8 + 16


def _time_scoring(router, images: list[tuple[Tensor, Tensor]]) -> float:
    router.score_moments(*images[0])  # warm (the full router prepares its factors)
    start = time.perf_counter()
    for second, first in images:
        router.score_moments(second, first)
    return (time.perf_counter() - start) / len(images)


def _accuracy(router, truth: list[int], images: list[tuple[Tensor, Tensor]]) -> float:
    names = list(router.domains)
    right = 0
    for index, (second, first) in zip(truth, images, strict=True):
        scores, _ = router.score_moments(second, first)
        right += int(scores.argmax(1).item() == names.index(f"d{index:04d}"))
    return right / len(images)


def run_route_scale(domains: tuple[int, ...] = (10, 100, 1000), *, test_images: int = 40,
                    full_limit: int = 100, threads: int = 1) -> dict[str, Any]:
    """One row per number of domains (see the module docstring)."""
    torch.set_num_threads(threads)
    synthetic = _Synthetic()
    rows = []
    for count in domains:
        gen = torch.Generator().manual_seed(count)
        truth = torch.randint(0, count, (test_images,), generator=gen).tolist()
        images = [synthetic.image(t, 1_000_000 + i) for i, t in enumerate(truth)]
        lazy = {f"d{i:04d}": (lambda i=i: synthetic.moments(i)) for i in range(count)}
        start = time.perf_counter()
        compact = CompactRouter.build(lazy, tokens_per_image=TOKENS)
        row: dict[str, Any] = {
            "domains": count, "dim": DIM, "rank": compact.rank,
            "compact_domain_bytes": compact.domain_nbytes(),
            "compact_shared_bytes": compact.shared_nbytes(),
            "compact_build_s": round(time.perf_counter() - start, 2),
            "compact_ms_per_image": round(_time_scoring(compact, images) * 1000, 2),
            "compact_accuracy": _accuracy(compact, truth, images),
            "full_domain_bytes": _full_bytes(DIM)}
        del compact
        if count <= full_limit:
            start = time.perf_counter()
            full = DomainRouter()
            for name, thunk in lazy.items():
                m = thunk()
                full.fold_moments(name, m.gram.float(), m.count, m.mean.float())
            row["full_ms_per_image"] = round(_time_scoring(full, images) * 1000, 2)
            row["full_build_s"] = round(time.perf_counter() - start, 2)  # incl. factors
            row["full_accuracy"] = _accuracy(full, truth, images)
            del full
        rows.append(row)
    return {"rows": rows, "test_images": test_images, "threads": threads,
            "tokens_per_image": TOKENS}


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def scale_text(report: dict[str, Any]) -> str:
    lines = [f"router cost at vit_b's width (D = {DIM}), synthetic statistics; "
             f"{report['threads']} torch thread(s); accuracy on {report['test_images']} "
             "images drawn from the synthetic domains",
             "", "| domains | router | bytes per domain | bytes in all | build s | "
                 "ms to score one image | accuracy |", "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        total = row["compact_shared_bytes"] + row["domains"] * row["compact_domain_bytes"]
        lines.append(f"| {row['domains']} | compact (K = {row['rank']}) | "
                     f"{_size(row['compact_domain_bytes'])} | {_size(total)} | "
                     f"{row['compact_build_s']} | {row['compact_ms_per_image']} | "
                     f"{row['compact_accuracy']:.3f} |")
        full_total = row["domains"] * row["full_domain_bytes"]
        if "full_ms_per_image" in row:
            lines.append(f"| {row['domains']} | full | {_size(row['full_domain_bytes'])} | "
                         f"{_size(full_total)} | {row['full_build_s']} | "
                         f"{row['full_ms_per_image']} | {row['full_accuracy']:.3f} |")
        else:
            lines.append(f"| {row['domains']} | full | {_size(row['full_domain_bytes'])} | "
                         f"{_size(full_total)} | not run | not run | not run |")
    return "\n".join(lines)
