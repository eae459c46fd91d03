"""A data-free domain router built from the statistics domain adapters already carry.

Each domain t is a Gaussian over the tokens at the first adapted linear's input: mean μ_t (the
statistics' ``.mean``; zero for statistics made before it existed) and covariance
Σ_t = G_t − μ_t μ_tᵀ from the Gram G_t = XᵀX/n, plus a ridge ``ridge · mean(diag Σ_t)``.
An image with moments (C, m) (:mod:`regcl.routing.features`) scores, per domain, the mean
log-likelihood of its tokens per token and per feature dimension:

    score_t = −½ [ (log det Σ_t + q_t) / D + log 2π ],
    q_t     = mean over tokens of (x − μ_t)ᵀ P_t (x − μ_t) = tr(P_t C) − 2 μ_tᵀP_t m + μ_tᵀP_t μ_t,

with P_t = Σ_t⁻¹. The image goes to the best domain when it beats the runner-up by at least
``min_margin`` and its *novelty* q_best / D (about 1 for tokens drawn from that Gaussian) is at
most ``max_novelty``; otherwise the route says to fall back (``domain`` None), e.g. to the
merged live adapter. Each domain's score depends on that domain alone, so a router over a
subset of domains scores exactly as the full one restricted to them.

State: per domain (sorted by name, so fold order does not matter) the Gram D x D, mean D and
token count, as given; nothing else is stored. Memory grows by one D x D Gram per domain
(plus a cached D x D factor), unlike the merge state, which stays the same size.
Persisted with safetensors (tensors + JSON metadata); never pickle.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from regcl.adapters.layout import count_key, gram_key, mean_key
from regcl.errors import RoutingError
from regcl.routing.features import first_layer_key, token_moments
from regcl.routing.thresholds import DEFAULT_MAX_NOVELTY, DEFAULT_MIN_MARGIN

__all__ = ["DEFAULT_MAX_NOVELTY", "DEFAULT_MIN_MARGIN", "DomainRouter", "Route", "decide"]

_METADATA_KEY = "regcl_domain_router"
_FORMAT_VERSION = 1
_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class Route:
    """Where one image goes.

    domain:  the chosen domain, or None to fall back (not confident, or unlike every domain).
    best:    the highest-scoring domain (chosen or not).
    margin:  best score minus the runner-up's (``inf`` with a single domain).
    novelty: q_best / D for the best domain (about 1 in-domain; large for images from nowhere).
    scores:  every domain's score (mean log-likelihood per token and feature dimension).
    """

    domain: str | None
    best: str
    margin: float
    novelty: float
    scores: dict[str, float]


def decide(scores: Tensor, novelty: Tensor, *, min_margin: float = DEFAULT_MIN_MARGIN,
           max_novelty: float = DEFAULT_MAX_NOVELTY) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The routing rule on score and novelty columns (B x T, domains sorted by name).

    Returns ``(best B, margin B, novelty of best B, chosen B bool)``: the best column (the
    first, i.e. the smallest name, on an exact tie), its lead over the runner-up (``inf`` with
    one column), and whether the route is taken (margin ≥ min_margin, novelty ≤ max_novelty).
    """
    if scores.dim() != 2 or scores.shape != novelty.shape or scores.shape[1] == 0:
        raise RoutingError(f"scores and novelty must be B x T alike, got {tuple(scores.shape)} "
                           f"and {tuple(novelty.shape)}")
    best = scores.argmax(1)  # first maximum: the smallest name among equals
    if scores.shape[1] > 1:
        top = scores.topk(2, dim=1).values
        margin = top[:, 0] - top[:, 1]
    else:
        margin = torch.full((scores.shape[0],), math.inf, dtype=scores.dtype)
    best_novelty = novelty.gather(1, best[:, None])[:, 0]
    chosen = (margin >= min_margin) & (best_novelty <= max_novelty)
    return best, margin, best_novelty, chosen


class DomainRouter:
    """Routes images to domain adapters by the Gaussian likelihood of their tokens.

    ridge: relative ridge ≥ 0 added to each domain's covariance (``ridge · mean diag``), so a
    covariance that is singular (a direction a domain never excited) stays invertible.
    """

    def __init__(self, ridge: float = 1e-4) -> None:
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (
            math.isfinite(ridge) and ridge >= 0
        ):
            raise RoutingError(f"ridge must be a finite number >= 0, got {ridge!r}")
        self._ridge = float(ridge)
        self._key: str | None = None
        self._names: list[str] = []
        self._grams: list[Tensor] = []  # D x D each, as given (float32 from adapter stats)
        self._means: list[Tensor | None] = []
        self._counts: list[int] = []
        self._factors: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # cache

    # -- read-only views -----------------------------------------------------------------------

    @property
    def ridge(self) -> float:
        return self._ridge

    @property
    def key(self) -> str | None:
        """The adapter weight key whose input statistics the router uses (None when empty)."""
        return self._key

    @property
    def domains(self) -> tuple[str, ...]:
        """The domains known, sorted by name."""
        return tuple(self._names)

    @property
    def num_domains(self) -> int:
        return len(self._names)

    @property
    def dim(self) -> int | None:
        return None if not self._grams else int(self._grams[0].shape[0])

    def nbytes(self) -> int:
        """Bytes of the stored statistics: grows by one Gram (D x D) and mean per domain."""
        total = sum(g.numel() * g.element_size() for g in self._grams)
        return total + sum(m.numel() * m.element_size() for m in self._means if m is not None)

    def __repr__(self) -> str:
        return f"DomainRouter(domains={self._names}, dim={self.dim}, ridge={self._ridge})"

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def from_stats(cls, stats: Mapping[str, Mapping[str, Tensor]], *, ridge: float = 1e-4,
                   key: str | None = None) -> DomainRouter:
        """A router over ``{domain: adapter statistics}`` (as :meth:`fold` one by one)."""
        router = cls(ridge)
        for domain in sorted(stats):
            router.fold(domain, stats[domain], key=key)
        return router

    def fold(self, domain: str, stats: Mapping[str, Tensor], *, key: str | None = None) -> None:
        """Adds ``domain`` from its adapter statistics (``K.gram``, ``K.count``, ``K.mean``).

        key: the LoRA weight key K to read (default: :func:`first_layer_key` of ``stats``,
        and the router's own key once it has one). RoutingError when the statistics are
        missing or malformed, or the domain is known already; the router is then unchanged.
        """
        if not isinstance(stats, Mapping):
            raise RoutingError(f"statistics of {domain!r} must be a dict of tensors")
        key = key or self._key or first_layer_key(stats)
        if self._key is not None and key != self._key:
            raise RoutingError(f"this router reads {self._key!r}, not {key!r}")
        gram, count = stats.get(gram_key(key)), stats.get(count_key(key))
        if not isinstance(gram, Tensor) or not isinstance(count, Tensor):
            raise RoutingError(f"statistics of {domain!r} lack {gram_key(key)} / "
                               f"{count_key(key)}")
        self.fold_moments(domain, gram, int(count.reshape(())), stats.get(mean_key(key)),
                          key=key)

    def fold_moments(self, domain: str, gram: Tensor, count: int, mean: Tensor | None = None,
                     *, key: str | None = None) -> None:
        """Adds ``domain`` from its moments: ``gram`` D x D (XᵀX/n), ``count`` n ≥ 1, ``mean`` D
        or None (treated as zero, as for statistics made before means were kept)."""
        if not isinstance(domain, str) or not domain:
            raise RoutingError("domain must be a non-empty string")
        if domain in self._names:
            raise RoutingError(f"domain {domain!r} is already in the router; remove it first")
        dim = self.dim
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or (
            dim is not None and gram.shape[0] != dim
        ):
            want = "square" if dim is None else f"{dim} x {dim}"
            raise RoutingError(f"Gram of {domain!r} must be {want}, got {tuple(gram.shape)}")
        if not gram.is_floating_point() or not bool(torch.isfinite(gram).all()):
            raise RoutingError(f"Gram of {domain!r} must be finite floating-point values")
        if isinstance(count, bool) or int(count) < 1:
            raise RoutingError(f"token count of {domain!r} must be >= 1, got {count}")
        if mean is not None and (
            tuple(mean.shape) != (gram.shape[0],)
            or not mean.is_floating_point()
            or not bool(torch.isfinite(mean).all())
        ):
            raise RoutingError(f"mean of {domain!r} must be a finite vector of {gram.shape[0]}")
        where = sum(name < domain for name in self._names)
        self._names.insert(where, domain)
        self._grams.insert(where, gram.detach().to("cpu").clone())
        self._means.insert(where, None if mean is None else mean.detach().to("cpu").clone())
        self._counts.insert(where, int(count))
        if key is not None:
            self._key = key
        self._factors = None

    def remove(self, domain: str) -> None:
        """Forgets ``domain`` (exact: the other domains' scores do not change)."""
        if domain not in self._names:
            raise RoutingError(f"unknown domain {domain!r}; known: {', '.join(self._names)}")
        where = self._names.index(domain)
        for store in (self._names, self._grams, self._means, self._counts):
            del store[where]
        if not self._names:
            self._key = None
        self._factors = None

    # -- scoring -------------------------------------------------------------------------------

    def _prepared(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(P T x D x D, Pμ T x D, μᵀPμ T, log det Σ T)`` in float64, cached."""
        if self._factors is None:
            if not self._names:
                raise RoutingError("the router has no domains: fold adapter statistics first")
            precisions, pmus, quads, logdets = [], [], [], []
            for name, gram, mean in zip(self._names, self._grams, self._means):
                g = gram.to(torch.float64)
                g = (g + g.T) / 2
                mu = torch.zeros(g.shape[0], dtype=torch.float64) if mean is None else (
                    mean.to(torch.float64))
                cov = g - torch.outer(mu, mu)
                scale = float(torch.diagonal(cov).mean())
                if self._ridge > 0:
                    cov = cov + self._ridge * max(scale, 1e-12) * torch.eye(g.shape[0],
                                                                           dtype=torch.float64)
                chol, info = torch.linalg.cholesky_ex(cov)
                if int(info) != 0:
                    raise RoutingError(
                        f"the covariance of {name!r} is not positive definite; use ridge > 0"
                    )
                precision = torch.cholesky_inverse(chol)
                pmu = precision @ mu
                precisions.append(precision)
                pmus.append(pmu)
                quads.append(mu @ pmu)
                logdets.append(2 * torch.log(torch.diagonal(chol)).sum())
            self._factors = (torch.stack(precisions), torch.stack(pmus), torch.stack(quads),
                             torch.stack(logdets))
        return self._factors

    def score_moments(self, second: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
        """Scores from image moments (:mod:`regcl.routing.features`).

        second: B x D x D; first: B x D. Returns ``(scores B x T, novelty B x T)`` in float64,
        columns in :attr:`domains` order.
        """
        precision, pmu, quad_mu, logdet = self._prepared()
        dim = precision.shape[-1]
        if second.dim() != 3 or tuple(second.shape[1:]) != (dim, dim) or (
            tuple(first.shape) != (second.shape[0], dim)
        ):
            raise RoutingError(
                f"moments must be B x {dim} x {dim} and B x {dim}, got "
                f"{tuple(second.shape)} and {tuple(first.shape)}"
            )
        second, first = second.to(torch.float64), first.to(torch.float64)
        # Domain by domain with the same reductions, so a domain's score is bit-for-bit the
        # same whichever other domains the router holds.
        q = torch.stack([
            (precision[t] * second).sum((1, 2)) - 2 * (first * pmu[t]).sum(1) + quad_mu[t]
            for t in range(precision.shape[0])], dim=1)
        scores = -0.5 * ((logdet[None, :] + q) / dim + _LOG_2PI)
        return scores, q / dim

    def scores(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`score_moments` of tokens B x N x D or B x H x W x D (no padding counted)."""
        second, first, _ = token_moments(tokens)
        return self.score_moments(second, first)

    def decide(self, scores: Tensor, novelty: Tensor, *, min_margin: float = DEFAULT_MIN_MARGIN,
               max_novelty: float = DEFAULT_MAX_NOVELTY) -> list[Route]:
        """One :class:`Route` per row of ``scores`` / ``novelty`` (B x T, from the scorers)."""
        best, margin, best_novelty, chosen = decide(scores, novelty, min_margin=min_margin,
                                                    max_novelty=max_novelty)
        return [
            Route(domain=self._names[b] if c else None, best=self._names[b], margin=m,
                  novelty=n, scores=dict(zip(self._names, row)))
            for b, m, n, c, row in zip(best.tolist(), margin.tolist(), best_novelty.tolist(),
                                       chosen.tolist(), scores.tolist())
        ]

    def route(self, tokens: Tensor, **thresholds: float) -> Route:
        """Routes one image: tokens N x D or H x W x D (``min_margin``, ``max_novelty``)."""
        if tokens.dim() not in (2, 3):
            raise RoutingError(f"one image's tokens are N x D or H x W x D, "
                               f"got {tuple(tokens.shape)}")
        return self.route_batch(tokens.unsqueeze(0), **thresholds)[0]

    def route_batch(self, tokens: Tensor, **thresholds: float) -> list[Route]:
        """Routes B images: tokens B x N x D or B x H x W x D."""
        return self.decide(*self.scores(tokens), **thresholds)

    def route_moments(self, second: Tensor, first: Tensor, **thresholds: float) -> list[Route]:
        """Routes B images from their moments (e.g. :func:`~regcl.routing.first_layer_moments`,
        which counts window padding as the statistics do)."""
        return self.decide(*self.score_moments(second, first), **thresholds)

    # -- persistence ---------------------------------------------------------------------------

    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """``(tensors, metadata)`` as written to safetensors; tensors are copies."""
        tensors: dict[str, Tensor] = {}
        if self._names:
            tensors["grams"] = torch.stack(self._grams).contiguous()
            tensors["counts"] = torch.tensor(self._counts, dtype=torch.int64)
            dim = self._grams[0].shape[0]
            tensors["means"] = torch.stack([
                torch.zeros(dim, dtype=self._grams[0].dtype) if m is None
                else m.to(self._grams[0].dtype) for m in self._means]).contiguous()
        header = {"format": _FORMAT_VERSION, "ridge": self._ridge, "key": self._key,
                  "domains": self._names, "has_mean": [m is not None for m in self._means]}
        return tensors, {_METADATA_KEY: json.dumps(header)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor],
                     metadata: Mapping[str, str]) -> DomainRouter:
        """Rebuilds a router written by :meth:`to_tensors`; RoutingError when it does not add up."""
        try:
            header = json.loads(metadata[_METADATA_KEY])
            version, ridge, key = header["format"], header["ridge"], header["key"]
            names, has_mean = header["domains"], header["has_mean"]
        except (KeyError, TypeError, ValueError) as error:
            raise RoutingError(f"not a regcl domain router (bad metadata: {error})") from None
        if version != _FORMAT_VERSION:
            raise RoutingError(f"unsupported domain router format {version!r}")
        if not isinstance(names, list) or not isinstance(has_mean, list) or (
            len(has_mean) != len(names)
        ):
            raise RoutingError("domain router metadata: domains and has_mean disagree")
        router = cls(ridge)
        if not names:
            if tensors:
                raise RoutingError("domain router has tensors but no domains")
            return router
        try:
            grams, counts, means = tensors["grams"], tensors["counts"], tensors["means"]
        except KeyError as error:
            raise RoutingError(f"domain router lacks tensor {error}") from None
        if grams.dim() != 3 or grams.shape[0] != len(names) or counts.shape != (len(names),) or (
            tuple(means.shape) != (len(names), grams.shape[1])
        ):
            raise RoutingError("domain router tensors do not match its domains")
        for i, name in enumerate(names):
            router.fold_moments(name, grams[i], int(counts[i]),
                                means[i] if has_mean[i] else None, key=key)
        if list(router.domains) != names:
            raise RoutingError("domain router metadata: domains are not unique and sorted")
        return router

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the router to a safetensors file."""
        tensors, metadata = self.to_tensors()
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DomainRouter:
        """Reads a router written by :meth:`save` (RoutingError when it is not one)."""
        return cls.from_tensors(*read_router_file(path, "a domain router"))


def read_router_file(path: str | os.PathLike[str],
                     what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A router's safetensors file: its tensors and metadata (RoutingError naming ``what``
    when it cannot be read)."""
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(os.fspath(path)), metadata
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise RoutingError(f"cannot read {what} from {path}: {error}") from None

