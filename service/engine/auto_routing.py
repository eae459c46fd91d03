"""``adapter: "auto"``: which domain adapter serves an image, decided from the statistics the
registered domain adapters carry (:mod:`regcl.routing`).

:class:`DomainRouting` owns the serving process's :class:`~regcl.routing.DomainRouter`: the
registered adapters whose statistics fit (one :class:`DomainEntry` each), rebuilt from scratch
on every change (:meth:`DomainRouting.replace`), so its state always equals a router built
from those adapters' statistics alone. It also remembers each image's route per router
generation (an auto request for an image routed before costs no routing at all).

What a route costs the server that the merge does not: one D x D Gram and one D mean per domain
here (D: the width of the first adapted layer's input; 192 for the tiny SAM, 768 for vit_b),
plus the domain's own adapter, loaded when an image routes to it; the merged live adapter is
one adapter whatever the number of domains (README, "adapter auto").
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from regcl.adapters.layout import count_key, gram_key, mean_key
from regcl.errors import ConfigError, RoutingError
from regcl.routing import (
    DEFAULT_MAX_NOVELTY,
    DEFAULT_MIN_MARGIN,
    DomainRouter,
    Route,
    first_layer_key,
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

    key: that layer's LoRA weight key. gram: D x D (XᵀX/n). count: n. mean: D, or None for
    statistics made before means were kept. revision: the registry's sha256 of the adapter.
    """

    name: str
    revision: str
    key: str
    gram: Tensor
    count: int
    mean: Tensor | None

    @property
    def block(self) -> int:
        """The encoder block of :attr:`key`."""
        return _block_of(self.key)


def _block_of(key: str) -> int:
    match = _BLOCK.search(key)
    if match is None:
        raise RoutingError(f"{key} is not a layer of an encoder block")
    return int(match.group(1))


def read_domain_entry(stats_file: str | os.PathLike[str], name: str, revision: str
                      ) -> DomainEntry:
    """:func:`domain_entry` of a statistics file, reading only the router's three tensors
    (RoutingError when the file is not one)."""
    try:
        with safe_open(os.fspath(stats_file), framework="pt") as handle:
            names = list(handle.keys())
            key = first_layer_key(names)
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
    router: DomainRouter | None
    domains: tuple[RouterDomain, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def block(self) -> int | None:
        """The encoder block whose input the router reads (None: no router)."""
        return None if self.router is None or self.router.key is None else _block_of(
            self.router.key)

    def revision_of(self, name: str) -> str | None:
        return next((d.revision for d in self.domains if d.name == name), None)


def router_digest(router: DomainRouter | None) -> str:
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
    chosen in docs/benchmarks.md, "Domain routing"); otherwise ``auto`` falls back to ``live``.
    dim: the width D of the model's first-layer inputs; entries of another width are skipped.
    """

    def __init__(self, dim: int, *, min_margin: float = DEFAULT_MIN_MARGIN,
                 max_novelty: float = DEFAULT_MAX_NOVELTY,
                 ridge: float = DEFAULT_ROUTE_RIDGE) -> None:
        self.dim = int(dim)
        self.min_margin = _check_threshold("min_margin", min_margin)
        self.max_novelty = _check_threshold("max_novelty", max_novelty, positive=True)
        self.ridge = _check_threshold("ridge", ridge)
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
            if tuple(entry.gram.shape) != (self.dim, self.dim):
                skipped[entry.name] = (f"its statistics are {tuple(entry.gram.shape)}, the "
                                       f"model's first adapted layer reads {self.dim} features")
            else:
                usable.append(entry)
        router = None
        if usable:
            counts = Counter(e.key for e in usable)
            most = max(counts.values())
            key = first_layer_key(k for k, n in counts.items() if n == most)
            router = DomainRouter(self.ridge)
            for entry in usable:
                if entry.key != key:
                    skipped[entry.name] = (f"its first adapted layer is {entry.key}, the "
                                           f"router reads {key}")
                    continue
                router.fold_moments(entry.name, entry.gram, entry.count, entry.mean, key=key)
        kept = tuple(RouterDomain(e.name, e.revision, e.count) for e in usable
                     if e.name not in skipped)
        with self._lock:
            state = RouterState(self._state.generation + 1,
                                router if router is not None and router.num_domains else None,
                                kept, skipped)
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
