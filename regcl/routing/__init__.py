"""Data-free domain routing: which domain adapter fits an image, from adapter statistics alone.

- :mod:`regcl.routing.features`: the moments of an image's tokens the router reads.
- :mod:`regcl.routing.router`: :class:`DomainRouter` (fold domains in, route, save / load).
"""

from regcl.routing.features import first_layer_key, first_layer_moments, token_moments
from regcl.routing.router import (
    DEFAULT_MAX_NOVELTY,
    DEFAULT_MIN_MARGIN,
    DomainRouter,
    Route,
    decide,
)

__all__ = [
    "DEFAULT_MAX_NOVELTY",
    "DEFAULT_MIN_MARGIN",
    "DomainRouter",
    "Route",
    "decide",
    "first_layer_key",
    "first_layer_moments",
    "token_moments",
]
