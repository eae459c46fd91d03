"""Data-free domain routing: which domain adapter fits an image, from adapter statistics alone.

- :mod:`regcl.routing.features`: the moments of an image's tokens the router reads.
- :mod:`regcl.routing.router`: :class:`DomainRouter`, a full Gaussian per domain (fold domains
  in, route, save / load): the reference.
- :mod:`regcl.routing.compact`: :class:`CompactRouter`, the served one: shared whitening and
  subspace, a small state per domain, a prior for domains seen on few images.
- :mod:`regcl.routing.thresholds`: the default margin and novelty (no torch).

The names below are imported from their submodule on first use.
"""

from regcl._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("DEFAULT_MAX_DIVERGENCE", "DEFAULT_MAX_NOVELTY", "DEFAULT_MIN_MARGIN"),
                    "thresholds"),
    **dict.fromkeys(("CompactRouter", "DomainMoments"), "compact"),
    **dict.fromkeys(("DomainRouter", "Route", "decide"), "router"),
    **dict.fromkeys(("first_layer_key", "first_layer_moments", "token_moments",
                     "tokens_per_image"), "features"),
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
