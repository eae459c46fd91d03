"""A domain router whose per-domain state stays small: shared whitening, a shared subspace, and
per domain a K x K covariance in that subspace, shrunk towards the pooled one.

:class:`~regcl.routing.router.DomainRouter` keeps a full D x D Gaussian per domain: at vit_b
(D = 768) its Gram and cached precision are 6.8 MiB per domain, eleven times the domain's
adapter, and each image costs D² per domain to score. This router keeps the same model of a
domain (a Gaussian over the tokens at the first adapted linear's input, scored by the mean
log-likelihood per token and feature) in a compressed form built from all domains together:

- **shared** (once, whatever the number of domains): the pooled mean μ̄ and covariance S of the
  domains' mixture (each domain weighs the same), the whitening W = S^{-1/2}, and a rotation
  whose first K directions U (D x K) carry most of the whitened domains' divergence from the
  pool (top eigenvectors of Σ_t [V_t f(Λ_t) V_tᵀ + ν_t ν_tᵀ], f(λ) = λ − 1 − log λ over the
  eigenvalues of C_t, the domain's whitened covariance: the Gaussian KL's own terms);
- **per domain** t: its whitened, rotated mean ν_t = W(μ_t − μ̄) (D), its covariance inside
  the subspace G_t = Uᵀ C_t U (stored as its inverse, K x K), and its variances along the
  D − K other rotated directions (a diagonal), so in whitened coordinates
  C_t ≈ U G_t Uᵀ + V diag(d_t) Vᵀ;
- **prior** (few images): before the subspace is chosen, C_t is shrunk towards the pool,
  (n_t C_t + κ I) / (n_t + κ), with n_t the images behind the domain's statistics (its token
  count over the tokens per image) and κ = ``prior_images``: a domain seen on three images
  borrows the spread of the others, one seen on hundreds keeps its own.

Scoring an image with moments (C, m) (:mod:`regcl.routing.features`): once per image, its
centred moments are whitened and rotated (D³ flops, like the moments themselves): A, the
K x K block inside the subspace, y, the diagonal outside it, and its rotated mean (a inside,
w outside); then per domain only O(K² + D), the log-likelihood's quadratic term

    q_t = tr(G_t⁻¹ (A − a bᵀ − b aᵀ + b bᵀ)) + Σ_j (y_j − 2 w_j n_j + n_j²) / d_tj

(b, n: ν_t's parts inside and outside), and ``score_t = −½ [(log det Σ_t + q_t) / D +
log 2π]`` as the full router. With K = D this is the full router's Gaussian exactly.

Novelty (how unlike the best domain the image is) compares the image's own token Gaussian
(covariance Σ_img) with the domain's: ``½ [q_t / D − 1 + w (log det Σ_t − log det Σ_img) /
D]``. With w = 1 it is their Kullback-Leibler divergence per feature: about 0 for an image
like the domain's, large for tokens far from it (noise) and for tokens far too alike (a
uniform image, whose q_t alone looks typical). ``volume_weight`` w = 2 counts an image much
narrower than the domain (a hazy, low-contrast twin of it) twice: on the calibration seeds it
turned 96 % of the images of unseen domains away at the threshold that lets 95 % of the
trained domains' images through, against 89 % with w = 1 and 68 % for the full router's
q_t / D (docs/benchmarks.md, "A router that scales").

Unlike the full router, a domain's score here depends on the other domains (the pool, the
subspace): the router is rebuilt from all domains' moments whenever one changes (the service
does), and two builds over the same domains are identical. Persisted with safetensors.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from regcl.errors import RoutingError
from regcl.routing.router import Route, decide, read_router_file
from regcl.routing.thresholds import DEFAULT_MAX_NOVELTY, DEFAULT_MIN_MARGIN

__all__ = ["DEFAULT_PRIOR_IMAGES", "DEFAULT_RANK", "DEFAULT_VOLUME_WEIGHT", "CompactRouter",
           "DomainMoments"]

DEFAULT_RANK = 128
"""K: the shared subspace's dimension (at vit_b, 64 KiB of per-domain covariance; the
domain's adapter is 600 KiB)."""
DEFAULT_PRIOR_IMAGES = 1.0
"""κ: the pool's weight, in images, in each domain's covariance. Measured (ten domains,
calibration seeds): from 3 images 0.869 -> 0.900 accuracy, from 6 0.932 -> 0.953, from 12
0.973 -> 0.982; from 24 and 48 it costs 0.2-0.3 points."""
DEFAULT_VOLUME_WEIGHT = 2.0
"""w: the weight of the log-volume gap in the novelty (see the module docstring)."""
_LOG_2PI = math.log(2 * math.pi)
_METADATA_KEY = "regcl_compact_router"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class DomainMoments:
    """A domain's token moments at the router's layer: ``gram`` D x D (XᵀX/n), ``mean`` D (None:
    zero, for statistics made before means were kept) and the token ``count`` n."""

    gram: Tensor
    count: int
    mean: Tensor | None = None


def _symmetric(matrix: Tensor) -> Tensor:
    return (matrix + matrix.transpose(-1, -2)) / 2


class _Reader:
    """Domain moments by name, checked, read (or called) anew each time they are needed."""

    def __init__(self, moments: Mapping[str, DomainMoments | Callable[[], DomainMoments]],
                 ridge: float) -> None:
        self._moments = moments
        self._ridge = ridge

    def get(self, name: str) -> DomainMoments:
        value = self._moments[name]
        return value() if callable(value) else value

    def covariance(self, name: str, dim: int | None) -> tuple[Tensor, Tensor, int]:
        """``(covariance D x D, mean D, token count)`` in float64, checked; the covariance
        with the full router's ridge (``ridge · mean diag``), so a direction the domain never
        excites (LayerNorm's output has one per token) stays positive."""
        m = self.get(name)
        gram = m.gram
        if gram.dim() == 2 and dim is None:
            dim = int(gram.shape[0])  # the first domain sets the width
        if gram.dim() != 2 or tuple(gram.shape) != (dim, dim):
            want = "square" if dim is None else f"{dim} x {dim}"
            raise RoutingError(f"Gram of {name!r} must be {want}, got {tuple(gram.shape)}")
        if not gram.is_floating_point() or not bool(torch.isfinite(gram).all()):
            raise RoutingError(f"Gram of {name!r} must be finite floating-point values")
        if isinstance(m.count, bool) or int(m.count) < 1:
            raise RoutingError(f"token count of {name!r} must be >= 1, got {m.count}")
        mean = torch.zeros(dim, dtype=torch.float64) if m.mean is None else m.mean
        if tuple(mean.shape) != (dim,) or not mean.is_floating_point() or not bool(
                torch.isfinite(mean).all()):
            raise RoutingError(f"mean of {name!r} must be a finite vector of {dim}")
        mean = mean.detach().to("cpu", torch.float64)
        g = _symmetric(gram.detach().to("cpu", torch.float64))
        cov = g - torch.outer(mean, mean)
        cov += self._ridge * max(float(torch.diagonal(cov).mean()), 1e-12) * torch.eye(
            dim, dtype=torch.float64)
        return cov, mean, int(m.count)


class CompactRouter:
    """Routes images to domains by a compressed Gaussian per domain (see the module docstring).

    Build it with :meth:`build`; it is immutable afterwards.
    """

    def __init__(self, *, names: list[str], key: str | None, rank: int, prior_images: float,
                 tokens_per_image: int, ridge: float, volume_weight: float,
                 shared: dict[str, Tensor], domains: dict[str, Tensor]) -> None:
        self._names = list(names)
        self._key = key
        self.rank = int(rank)
        self.prior_images = float(prior_images)
        self.tokens_per_image = int(tokens_per_image)
        self.ridge = float(ridge)
        self.volume_weight = float(volume_weight)
        # shared: mean D; projector D x D (the whitening, then the rotation whose first K
        # columns span the subspace)
        self._shared = shared
        # per domain: precision T x K x K, nu T x D (whitened, rotated), outside T x (D - K),
        # logdet / images T
        self._domains = domains

    # -- read-only views -----------------------------------------------------------------------
    @property
    def key(self) -> str | None:
        return self._key

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self._names)

    @property
    def num_domains(self) -> int:
        return len(self._names)

    @property
    def dim(self) -> int:
        return int(self._shared["mean"].shape[0])

    def nbytes(self) -> int:
        """Bytes of the whole state (shared and per domain)."""
        return self.shared_nbytes() + self.num_domains * self.domain_nbytes()

    def shared_nbytes(self) -> int:
        """Bytes of the state shared by all domains (pool, whitening, subspace)."""
        return sum(t.numel() * t.element_size() for t in self._shared.values())

    def domain_nbytes(self) -> int:
        """Bytes each domain adds."""
        per = sum(t[0].numel() * t.element_size() for t in self._domains.values())
        return per

    def images(self, domain: str) -> float:
        """The images behind ``domain``'s statistics (token count / tokens per image)."""
        return float(self._domains["images"][self._names.index(domain)])

    def __repr__(self) -> str:
        return (f"CompactRouter(domains={self._names}, dim={self.dim}, rank={self.rank}, "
                f"prior_images={self.prior_images}, volume_weight={self.volume_weight})")

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_stats(cls, stats: Mapping[str, Mapping[str, Tensor]], *, key: str | None = None,
                   **options: Any) -> CompactRouter:
        """The router over ``{domain: adapter statistics}``, reading each domain's Gram, count
        and mean at ``key`` (default: :func:`~regcl.routing.first_layer_key` of the first
        domain's statistics); ``options`` as :meth:`build`."""
        from regcl.adapters.layout import count_key, gram_key, mean_key
        from regcl.routing.features import first_layer_key

        if not stats:
            raise RoutingError("a router needs at least one domain")
        key = key or first_layer_key(next(iter(stats.values())))
        moments = {}
        for name, values in stats.items():
            gram, count = values.get(gram_key(key)), values.get(count_key(key))
            if not isinstance(gram, Tensor) or not isinstance(count, Tensor):
                raise RoutingError(f"statistics of {name!r} lack {gram_key(key)} / "
                                   f"{count_key(key)}")
            moments[name] = DomainMoments(gram, int(count.reshape(())),
                                          values.get(mean_key(key)))
        return cls.build(moments, key=key, **options)

    @classmethod
    def build(cls, moments: Mapping[str, DomainMoments | Callable[[], DomainMoments]], *,
              key: str | None = None, rank: int = DEFAULT_RANK,
              prior_images: float = DEFAULT_PRIOR_IMAGES, tokens_per_image: int = 1,
              ridge: float = 1e-4, volume_weight: float = DEFAULT_VOLUME_WEIGHT
              ) -> CompactRouter:
        """The router over ``moments`` ({domain: its moments, or a function that reads them});
        RoutingError when they are malformed (shapes, non-finite values, counts) or ``rank``
        / ``prior_images`` / ``tokens_per_image`` / ``ridge`` are out of range.

        Built in three passes over the domains (the pool; the subspace; each domain's
        compressed covariance), holding one domain's D x D moments at a time: given
        functions, it reads each domain three times and never holds them all (thousands of
        domains at vit_b's width would be gigabytes)."""
        if not moments:
            raise RoutingError("a router needs at least one domain")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise RoutingError(f"rank must be an int >= 1, got {rank!r}")
        for name, value in (("prior_images", prior_images), ("ridge", ridge),
                            ("volume_weight", volume_weight)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(value) and value >= 0):
                raise RoutingError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(tokens_per_image, bool) or int(tokens_per_image) < 1:
            raise RoutingError(f"tokens_per_image must be >= 1, got {tokens_per_image!r}")
        names = sorted(moments)
        if not all(isinstance(name, str) and name for name in names):
            raise RoutingError("domain names must be non-empty strings")
        reader = _Reader(moments, ridge)

        # pass 1: the pool (mixture of the domains, each weighing the same)
        dim, total = None, None
        mus, images = [], []
        for name in names:
            cov, mean, count = reader.covariance(name, dim)
            dim = cov.shape[0]
            total = cov if total is None else total + cov
            mus.append(mean)
            images.append(count / int(tokens_per_image))
        mu = torch.stack(mus)
        pool_mean = mu.mean(0)
        spread = mu - pool_mean
        pool = _symmetric(total / len(names) + spread.T @ spread / len(names))
        values, vectors = torch.linalg.eigh(pool)
        values = values.clamp_min(1e-12 * max(float(values.mean()), 1e-12))
        whiten = vectors @ torch.diag(values.rsqrt()) @ vectors.T
        nu = spread @ whiten  # T x D (whiten is symmetric)
        n = torch.tensor(images, dtype=torch.float64)
        rank = min(rank, dim)

        def white(index: int) -> Tensor:
            cov, _, _ = reader.covariance(names[index], dim)
            c = _symmetric(whiten @ cov @ whiten)
            if prior_images > 0:
                c = (n[index] * c + prior_images * torch.eye(dim, dtype=torch.float64)) / (
                    n[index] + prior_images)
            return c

        # pass 2: the subspace holding most of the domains' divergence from the pool:
        # KL(N(ν_t, C_t) ‖ N(0, I)) = ½ [Σ_i f(λ_i) + |ν_t|²], f(λ) = λ − 1 − log λ over C_t's
        # eigenvalues, so the top eigenvectors of Σ_t [V_t f(Λ_t) V_tᵀ + ν_t ν_tᵀ] carry most
        nu_outer = nu.T @ nu
        spread_of = nu_outer
        for index in range(len(names)):
            lam, vec = torch.linalg.eigh(white(index))
            lam = lam.clamp_min(1e-12)
            spread_of += (vec * (lam - 1 - torch.log(lam))) @ vec.T
        _, directions = torch.linalg.eigh(_symmetric(spread_of))
        rotation = directions.flip(1).contiguous()  # strongest first; the first K: the subspace

        # pass 3: each domain inside the subspace (K x K), and its variances outside (diagonal)
        precisions, outsides, logdets = [], [], []
        for index, name in enumerate(names):
            c = rotation.T @ white(index) @ rotation
            inside = _symmetric(c[:rank, :rank])
            outside = torch.diagonal(c)[rank:].clamp_min(1e-12)
            chol, info = torch.linalg.cholesky_ex(inside)
            if int(info) != 0:
                raise RoutingError(f"the covariance of {name!r} is not positive definite; use "
                                   "ridge or prior_images > 0")
            precisions.append(_symmetric(torch.cholesky_inverse(chol)).float())
            outsides.append(outside)
            logdets.append(float(2 * torch.log(torch.diagonal(chol)).sum()
                                 + torch.log(outside).sum()))
        logdet_pool = float(torch.log(values).sum())
        shared = {"mean": pool_mean, "projector": whiten @ rotation}
        domains = {"precision": torch.stack(precisions), "nu": (nu @ rotation).float(),
                   "outside": torch.stack(outsides).float(),
                   "logdet": torch.tensor(logdets, dtype=torch.float64) + logdet_pool,
                   "images": n}
        return cls(names=names, key=key, rank=rank, prior_images=prior_images,
                   tokens_per_image=int(tokens_per_image), ridge=ridge,
                   volume_weight=volume_weight,
                   shared={k: v.contiguous() for k, v in shared.items()},
                   domains={k: v.contiguous() for k, v in domains.items()})

    # -- scoring -------------------------------------------------------------------------------
    def score_moments(self, second: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
        """Scores and novelty (B x T, float64, columns in :attr:`domains` order) of images with
        moments ``second`` B x D x D and ``first`` B x D."""
        scores, q, own_logdet = self.score_terms(second, first)
        dim = self.dim
        gap = (self._domains["logdet"][None] - own_logdet[:, None]) / dim
        novelty = 0.5 * (q / dim - 1 + self.volume_weight * gap)
        return scores, novelty

    def score_terms(self, second: Tensor, first: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(scores B x T, q B x T, log det of each image's own token covariance B)``."""
        dim = self.dim
        if second.dim() != 3 or tuple(second.shape[1:]) != (dim, dim) or (
                tuple(first.shape) != (second.shape[0], dim)):
            raise RoutingError(f"moments must be B x {dim} x {dim} and B x {dim}, got "
                               f"{tuple(second.shape)} and {tuple(first.shape)}")
        s, d = self._shared, self._domains
        rank = self.rank
        second, first = second.to(torch.float64), first.to(torch.float64)
        mean = s["mean"]
        centred = (second - first[:, :, None] * mean[None, None, :]
                   - mean[None, :, None] * first[:, None, :] + torch.outer(mean, mean))
        z = (first - mean) @ s["projector"]  # B x D: whitened, rotated mean
        turned = centred @ s["projector"]  # B x D x D
        projector = s["projector"]
        inside = projector[:, :rank].T @ turned[:, :, :rank]  # B x K x K
        outside = (turned[:, :, rank:] * projector[None, :, rank:]).sum(1)  # B x (D-K) diag
        precision, nu, var = d["precision"], d["nu"].double(), d["outside"].double()
        a, w = z[:, :rank], z[:, rank:]
        b, n = nu[:, :rank], nu[:, rank:]
        batch = inside.shape[0]
        q = (inside.reshape(batch, rank * rank).float()
             @ precision.reshape(-1, rank * rank).T).double()
        pb = torch.einsum("tk,tkj->tj", b.float(), precision).double()  # G_t⁻¹ b_t, T x K
        q += -2 * a @ pb.T + (b * pb).sum(1)[None]
        q += outside @ (1 / var).T - 2 * w @ (n / var).T + (n * n / var).sum(1)[None]
        scores = -0.5 * ((d["logdet"][None] + q) / dim + _LOG_2PI)
        own = second - first[:, :, None] * first[:, None, :]  # the image's token covariance
        own = _symmetric(own) + self.ridge * (
            torch.diagonal(own, dim1=1, dim2=2).mean(1).clamp_min(1e-12)[:, None, None]
            * torch.eye(dim, dtype=torch.float64))
        chol, _ = torch.linalg.cholesky_ex(own)
        own_logdet = 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2).clamp_min(1e-300)).sum(1)
        return scores, q, own_logdet

    def decide(self, scores: Tensor, novelty: Tensor, *, min_margin: float = DEFAULT_MIN_MARGIN,
               max_novelty: float = DEFAULT_MAX_NOVELTY) -> list[Route]:
        """One :class:`~regcl.routing.router.Route` per row of ``scores`` / ``novelty``."""
        best, margin, best_novelty, chosen = decide(scores, novelty, min_margin=min_margin,
                                                    max_novelty=max_novelty)
        return [Route(domain=self._names[i] if c else None, best=self._names[i], margin=m,
                      novelty=v, scores=dict(zip(self._names, row)))
                for i, m, v, c, row in zip(best.tolist(), margin.tolist(),
                                           best_novelty.tolist(), chosen.tolist(),
                                           scores.tolist())]

    def route_moments(self, second: Tensor, first: Tensor, **thresholds: float) -> list[Route]:
        """Routes B images from their moments (``min_margin``, ``max_novelty``)."""
        return self.decide(*self.score_moments(second, first), **thresholds)

    # -- persistence ---------------------------------------------------------------------------
    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """``(tensors, metadata)`` as written to safetensors."""
        tensors = {f"shared.{k}": v.clone() for k, v in self._shared.items()}
        tensors.update({f"domain.{k}": v.clone() for k, v in self._domains.items()})
        header = {"format": _FORMAT_VERSION, "key": self._key, "domains": self._names,
                  "rank": self.rank, "prior_images": self.prior_images,
                  "tokens_per_image": self.tokens_per_image, "ridge": self.ridge,
                  "volume_weight": self.volume_weight}
        return tensors, {_METADATA_KEY: json.dumps(header)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
                     ) -> CompactRouter:
        """Rebuilds a router written by :meth:`to_tensors` (RoutingError when it is not one)."""
        try:
            header = json.loads(metadata[_METADATA_KEY])
            if header["format"] != _FORMAT_VERSION:
                raise RoutingError(f"unsupported compact router format {header['format']!r}")
            names = list(header["domains"])
            shared = {k.removeprefix("shared."): v for k, v in tensors.items()
                      if k.startswith("shared.")}
            domains = {k.removeprefix("domain."): v for k, v in tensors.items()
                       if k.startswith("domain.")}
            router = cls(names=names, key=header["key"], rank=header["rank"],
                         prior_images=header["prior_images"],
                         tokens_per_image=header["tokens_per_image"], ridge=header["ridge"],
                         volume_weight=header["volume_weight"], shared=shared,
                         domains=domains)
        except (KeyError, TypeError, ValueError) as error:
            raise RoutingError(f"not a regcl compact router ({error})") from None
        want = {"mean", "projector"}
        have = {"precision", "nu", "outside", "logdet", "images"}
        if set(shared) != want or set(domains) != have or names != sorted(set(names)) or any(
                v.shape[0] != len(names) for v in domains.values()):
            raise RoutingError("compact router tensors do not match its domains")
        return router

    def save(self, path: str | os.PathLike[str]) -> None:
        tensors, metadata = self.to_tensors()
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CompactRouter:
        return cls.from_tensors(*read_router_file(path, "a compact router"))
