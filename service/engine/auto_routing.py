"""``adapter: "auto"``: which domain adapter serves an image, decided from the statistics the
registered domain adapters carry (:mod:`regcl.routing`).

:class:`DomainRouting` owns the serving process's router, a
:class:`~regcl.routing.compact.CompactRouter` over the registered adapters whose statistics fit
(one :class:`DomainEntry` each), rebuilt from scratch on every change
(:meth:`DomainRouting.replace`), so its state always equals a router built from those
adapters' statistics alone. It also remembers each image's route per router generation (an
auto request for an image routed before costs no routing at all).

What a route costs the server that the merge does not: per domain, the router's compressed
state (a K x K covariance, K = 128, and two D-vectors: 66 KiB for the tiny SAM, 70 KiB for
vit_b, whose adapter is 600 KiB) plus one shared whitening (D x D), and the domain's own
adapter, loaded when an image routes to it; the merged live adapter is one adapter whatever
the number of domains (README, "adapter auto"). A rebuild reads each domain's first-layer
statistics from its local file three times, one domain at a time, so thousands of domains
never sit in memory at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from regcl.adapters.layout import count_key, gram_key, mean_key
from regcl.errors import ConfigError, RoutingError
from regcl.routing import (
    DEFAULT_MAX_DIVERGENCE,
    DEFAULT_MIN_MARGIN,
    Route,
    first_layer_key,
)
from regcl.routing.compact import (
    DEFAULT_PRIOR_IMAGES,
    DEFAULT_RANK,
    DEFAULT_VOLUME_WEIGHT,
    CompactRouter,
    DomainMoments,
)
from service.engine.adapter_table import AUTO, LIVE

__all__ = ["AUTO", "AutoRoute", "DomainEntry", "DomainRouting", "RouterDomain", "RouterState",
           "domain_entry", "read_domain_entry", "router_digest"]

logger = logging.getLogger(__name__)

DEFAULT_ROUTE_RIDGE = 1e-4
_BLOCK = re.compile(r"\.blocks\.(\d+)\.")
_MAX_ROUTES = 4096  # remembered image routes (a few hundred bytes each)


@dataclass(frozen=True)
class DomainEntry:
    """One registered adapter's input moments at its first adapted layer.

    key: that layer's LoRA weight key. gram: D x D (XᵀX/n), or None when the moments stay in
    ``source`` (a statistics file) until the router reads them. count: n. mean: D, or None
    for statistics made before means were kept. revision: the registry's sha256 of the
    adapter. dim: D.
    """

    name: str
    revision: str
    key: str
    gram: Tensor | None
    count: int
    mean: Tensor | None
    source: str | None = None
    dim: int = 0

    def __post_init__(self) -> None:
        if not self.dim and self.gram is not None:
            object.__setattr__(self, "dim", int(self.gram.shape[-1]))

    @property
    def block(self) -> int:
        """The encoder block of :attr:`key`."""
        return _block_of(self.key)

    @property
    def square(self) -> bool:
        """Whether the Gram is D x D (a file's is checked from its header)."""
        if self.gram is not None:
            return self.gram.dim() == 2 and self.gram.shape[0] == self.gram.shape[1]
        return True

    def moments(self) -> DomainMoments:
        """The moments, read from :attr:`source` if they are not held (RoutingError)."""
        if self.gram is not None:
            return DomainMoments(self.gram, self.count, self.mean)
        entry = read_domain_entry(self.source, self.name, self.revision, lazy=False)
        if entry.key != self.key or entry.count != self.count:
            raise RoutingError(f"the statistics of {self.name!r} changed while the router read "
                               "them")
        return DomainMoments(entry.gram, entry.count, entry.mean)


def _block_of(key: str) -> int:
    match = _BLOCK.search(key)
    if match is None:
        raise RoutingError(f"{key} is not a layer of an encoder block")
    return int(match.group(1))


def read_domain_entry(stats_file: str | os.PathLike[str], name: str, revision: str, *,
                      lazy: bool = True) -> DomainEntry:
    """:func:`domain_entry` of a statistics file, reading only the router's three tensors
    (RoutingError when the file is not one). ``lazy``: read the header and the count now,
    the Gram and mean when the router is built."""
    try:
        with safe_open(os.fspath(stats_file), framework="pt") as handle:
            names = list(handle.keys())
            key = first_layer_key(names)
            if lazy and gram_key(key) in names and count_key(key) in names:
                shape = handle.get_slice(gram_key(key)).get_shape()
                count = handle.get_tensor(count_key(key))
                if len(shape) != 2 or shape[0] != shape[1] or count.numel() != 1:
                    raise RoutingError(f"statistics lack a square {gram_key(key)} / one "
                                       f"{count_key(key)}")
                return DomainEntry(name, revision, key, None, int(count.reshape(())), None,
                                   os.fspath(stats_file), int(shape[0]))
            stats = {k: handle.get_tensor(k) for k in (gram_key(key), count_key(key),
                                                        mean_key(key)) if k in names}
    except (OSError, SafetensorError) as exc:
        raise RoutingError(f"cannot read statistics: {exc}") from None
    return domain_entry(name, revision, stats)


def domain_entry(name: str, revision: str, stats: Mapping[str, Tensor]) -> DomainEntry:
    """The router's part of an adapter's statistics (RoutingError when they lack it)."""
    key = first_layer_key(stats)
    gram, count = stats.get(gram_key(key)), stats.get(count_key(key))
    if not isinstance(gram, Tensor) or not isinstance(count, Tensor) or count.numel() != 1:
        raise RoutingError(f"statistics lack {gram_key(key)} / {count_key(key)}")
    mean = stats.get(mean_key(key))
    return DomainEntry(name, revision, key, gram.detach().float().clone(),
                       int(count.reshape(())),
                       None if mean is None else mean.detach().float().clone())


@dataclass(frozen=True)
class AutoRoute:
    """What an ``auto`` request was served with.

    adapter: the adapter it encodes with (a domain's name, or ``live`` on fallback).
    route: the router's decision (None when no domain adapter has statistics).
    revision: the chosen domain adapter's sha256 (None on fallback).
    """

    adapter: str
    route: Route | None
    revision: str | None

    @property
    def confident(self) -> bool:
        return self.route is not None and self.route.domain is not None


@dataclass(frozen=True)
class RouterDomain:
    """A domain the router holds: its adapter's name and sha256, and the tokens behind it."""

    name: str
    revision: str
    tokens: int


@dataclass(frozen=True)
class RouterState:
    """One generation of the router (immutable once published). The router holds the only
    copy of the statistics; nothing else keeps them."""

    generation: int
    router: CompactRouter | None
    domains: tuple[RouterDomain, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def block(self) -> int | None:
        """The encoder block whose input the router reads (None: no router)."""
        return None if self.router is None or self.router.key is None else _block_of(
            self.router.key)

    def revision_of(self, name: str) -> str | None:
        return next((d.revision for d in self.domains if d.name == name), None)


def router_digest(router: CompactRouter | None) -> str:
    """sha256 of a router's whole state (metadata and every tensor's bytes): two routers
    with equal digests route every image alike."""
    digest = hashlib.sha256()
    if router is None:
        return digest.hexdigest()
    tensors, metadata = router.to_tensors()
    for name in sorted(metadata):
        digest.update(f"{name}={metadata[name]}\n".encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _check_threshold(name: str, value: float, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            value > 0 if positive else value >= 0) or value != value:
        raise ConfigError(f"{name} must be a number {'>' if positive else '>='} 0, got {value!r}")
    return float(value)


class DomainRouting:
    """The served router and its thresholds (see the module docstring).

    min_margin / max_novelty: a route is taken when the best domain leads the runner-up by at
    least ``min_margin`` and its novelty is at most ``max_novelty`` (the library's defaults,
    chosen in docs/benchmarks.md, "A router that scales"); otherwise ``auto`` falls back to
    ``live``. dim: the width D of the model's first-layer inputs; entries of another width are
    skipped. rank, prior_images, volume_weight, ridge: the router's
    (:class:`~regcl.routing.compact.CompactRouter`). tokens_per_image: tokens an image puts
    through the router's layer, given its block (window padding counted), so a domain's
    token count says how many images are behind it.
    """

    def __init__(self, dim: int, *, min_margin: float = DEFAULT_MIN_MARGIN,
                 max_novelty: float = DEFAULT_MAX_DIVERGENCE,
                 ridge: float = DEFAULT_ROUTE_RIDGE, rank: int = DEFAULT_RANK,
                 prior_images: float = DEFAULT_PRIOR_IMAGES,
                 volume_weight: float = DEFAULT_VOLUME_WEIGHT,
                 tokens_per_image: Callable[[int], int] | None = None) -> None:
        self.dim = int(dim)
        self.min_margin = _check_threshold("min_margin", min_margin)
        self.max_novelty = _check_threshold("max_novelty", max_novelty, positive=True)
        self.ridge = _check_threshold("ridge", ridge)
        self.prior_images = _check_threshold("prior_images", prior_images)
        self.volume_weight = _check_threshold("volume_weight", volume_weight)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"rank must be an int >= 1, got {rank!r}")
        self.rank = rank
        self._tokens_per_image = tokens_per_image or (lambda block: 1)
        self._lock = threading.Lock()
        self._state = RouterState(0, None)
        self._routes: OrderedDict[tuple[str, int], AutoRoute] = OrderedDict()

    @property
    def state(self) -> RouterState:
        return self._state

    def replace(self, entries: Sequence[DomainEntry], skipped: Mapping[str, str] | None = None
                ) -> RouterState:
        """Serve a router built from scratch over ``entries`` (a new generation).

        All domains of one router read one layer: the key most entries share (ties: the
        earliest layer); entries of another key or width are skipped, with the reason.
        """
        skipped = dict(skipped or {})
        usable = []
        for entry in sorted(entries, key=lambda e: e.name):
            if not entry.square or entry.dim != self.dim:
                skipped[entry.name] = (f"its statistics are {entry.dim} wide, the model's "
                                       f"first adapted layer reads {self.dim} features")
            else:
                usable.append(entry)
        router = None
        if usable:
            counts = Counter(e.key for e in usable)
            most = max(counts.values())
            key = first_layer_key(k for k, n in counts.items() if n == most)
            for entry in usable:
                if entry.key != key:
                    skipped[entry.name] = (f"its first adapted layer is {entry.key}, the "
                                           f"router reads {key}")
            routed = [e for e in usable if e.key == key]
            router = CompactRouter.build(
                {e.name: e.moments for e in routed}, key=key, rank=self.rank,
                prior_images=self.prior_images, volume_weight=self.volume_weight,
                tokens_per_image=self._tokens_per_image(_block_of(key)), ridge=self.ridge)
        kept = tuple(RouterDomain(e.name, e.revision, e.count) for e in usable
                     if e.name not in skipped)
        with self._lock:
            state = RouterState(self._state.generation + 1, router, kept, skipped)
            self._state = state
            self._routes.clear()
        logger.info("domain router generation %d: %d domain(s) %s, %d skipped",
                    state.generation, len(kept), [d.name for d in kept], len(skipped))
        return state

    def remembered(self, image_id: str, generation: int) -> AutoRoute | None:
        """The route of ``image_id`` under router ``generation``, if it was decided."""
        with self._lock:
            found = self._routes.get((image_id, generation))
            if found is not None:
                self._routes.move_to_end((image_id, generation))
            return found

    def decide(self, image_id: str, state: RouterState, second: Tensor, first: Tensor
               ) -> AutoRoute:
        """Route one image from its first-layer moments (second 1 x D x D, first 1 x D) under
        ``state``, and remember it while that generation is served."""
        if state.router is None:
            return AutoRoute(LIVE, None, None)
        route = state.router.route_moments(second.to(torch.float64), first.to(torch.float64),
                                           min_margin=self.min_margin,
                                           max_novelty=self.max_novelty)[0]
        chosen = AutoRoute(route.domain or LIVE, route,
                           None if route.domain is None else state.revision_of(route.domain))
        with self._lock:
            if self._state.generation == state.generation:
                self._routes[(image_id, state.generation)] = chosen
                while len(self._routes) > _MAX_ROUTES:
                    self._routes.popitem(last=False)
        return chosen

    def forget_image(self, image_id: str) -> None:
        with self._lock:
            for key in [k for k in self._routes if k[0] == image_id]:
                del self._routes[key]
