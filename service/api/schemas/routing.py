"""Schemas of ``adapter: "auto"``: how one request was routed, and ``GET /v1/router``."""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from service.engine.auto_routing import AutoRoute, DomainRouting, RouterState, router_digest

__all__ = ["RouteInfo", "RouterDomain", "RouterInfo", "RouterSkipped"]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class RouteInfo(BaseModel):
    """How ``adapter: "auto"`` chose: the domain router's best domain, its lead over the
    runner-up (``margin``) and how unlike that domain the image is (``novelty``, below about
    1.3 for most in-domain images). The route is taken when margin ≥ ``min_margin`` and
    novelty ≤ ``max_novelty``; otherwise (or when no adapter has statistics) the live merged
    adapter serves."""

    adapter_version: str = Field(description="What served the image: 'domain:<name>' when "
                                 "the route was taken, else 'live:<n>' (or 'base').")
    domain: str | None = Field(description="The domain adapter used; null: fell back to live.")
    revision: str | None = Field(description="sha256 of the domain adapter used.")
    confident: bool = Field(description="Whether the route was taken.")
    best: str | None = Field(description="The best-scoring domain (null: no router).")
    margin: float | None = Field(description="Best score minus the runner-up's (nats per "
                                 "token and feature); null with fewer than two domains.")
    novelty: float | None = Field(description="How unlike the best domain the image is: half "
                                  "its mean squared Mahalanobis distance per feature minus 1, "
                                  "plus twice its log-volume gap per feature (regcl.routing."
                                  "compact); null: no router.")
    min_margin: float
    max_novelty: float
    scores: dict[str, float] = Field(description="Every domain's score (mean log-likelihood "
                                     "per token and feature).")

    @classmethod
    def of(cls, chosen: AutoRoute, adapter_version: str, routing: DomainRouting) -> RouteInfo:
        route = chosen.route
        return cls(adapter_version=adapter_version,
                   domain=None if route is None else route.domain, revision=chosen.revision,
                   confident=chosen.confident, best=None if route is None else route.best,
                   margin=None if route is None else _finite(route.margin),
                   novelty=None if route is None else _finite(route.novelty),
                   min_margin=routing.min_margin, max_novelty=routing.max_novelty,
                   scores={} if route is None else {
                       k: v for k, v in route.scores.items() if math.isfinite(v)})

    def header(self) -> str:
        """The ``X-Regcl-Route`` header: ``chosen=...; best=...; margin=...; novelty=...``."""
        def number(value: float | None) -> str:
            return "none" if value is None else f"{value:.6g}"
        return (f"chosen={self.domain or 'live'}; best={self.best or 'none'}; "
                f"margin={number(self.margin)}; novelty={number(self.novelty)}")


class RouterDomain(BaseModel):
    """A domain the router knows: a registered adapter with statistics."""

    name: str
    revision: str = Field(description="sha256 of the adapter (as in GET /v1/adapters).")
    tokens: int = Field(description="Tokens behind its statistics.")


class RouterSkipped(BaseModel):
    """A registered adapter with statistics that the router leaves out, and why."""

    name: str
    reason: str


class RouterInfo(BaseModel):
    """The domain router ``adapter: "auto"`` uses in this API process. Its state is rebuilt
    from scratch from the registry's adapters whenever they change; ``state_sha256`` digests
    it (two routers with the same digest route every image alike)."""

    generation: int = Field(description="Grows by one with each rebuild in this process.")
    domains: list[RouterDomain]
    skipped: list[RouterSkipped]
    layer: str | None = Field(description="The adapter weight key whose input it reads.")
    block: int | None = Field(description="The encoder block that layer is in: the encoder "
                              "runs up to it once per image before the route is chosen.")
    dim: int = Field(description="Features per token at that layer.")
    state_bytes: int = Field(description="Bytes of its state: a shared whitening (dim x dim) "
                             "and per domain a rank x rank covariance and two vectors.")
    state_sha256: str
    min_margin: float
    max_novelty: float

    @classmethod
    def of(cls, state: RouterState, routing: DomainRouting) -> RouterInfo:
        router = state.router
        return cls(generation=state.generation,
                   domains=[RouterDomain(name=d.name, revision=d.revision, tokens=d.tokens)
                            for d in state.domains],
                   skipped=[RouterSkipped(name=n, reason=r)
                            for n, r in sorted(state.skipped.items())],
                   layer=None if router is None else router.key, block=state.block,
                   dim=routing.dim, state_bytes=0 if router is None else router.nbytes(),
                   state_sha256=router_digest(router), min_margin=routing.min_margin,
                   max_novelty=routing.max_novelty)
