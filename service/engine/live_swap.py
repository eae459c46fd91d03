"""Keeping the engine in step with the registry: the live version and domain adapters.

:class:`LiveFollower` makes the engine serve whatever version the Redis live pointer names. It
is triggered by the registry's live subscription (every replica follows the pointer), by the
activate endpoint (so the replica that took the request serves the new version before it
answers) and once at startup (a restarted process serves the live version at once). Each
trigger re-reads the pointer, under one lock, so triggers arriving in any order converge on
the pointer's current value and a late notification never rolls the engine back.

:class:`DomainAdapters` is where the engine loads a domain adapter from when a request names
one that is not loaded (never, evicted, or uploaded anew since).

:class:`RouterFollower` keeps the engine's domain router (``adapter: "auto"``) equal to one
built from scratch over the registry's adapters with statistics: it is triggered by the
registry's adapters subscription (every replica hears of each add and delete, the way it
hears of a live swap), by each live notice, and once at startup; each trigger re-lists the
registry under one lock and rebuilds the router when the set of adapters changed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import get_peft_model

from infra.errors import InvalidName, NotFound, StoreUnavailable
from infra.live import LiveSubscription
from infra.registry import Registry
from regcl.adapters import AdapterFiles, check_weights, read_adapter
from regcl.adapters.layout import STATS_FILE
from regcl.errors import AdapterError, RoutingError
from regcl.models.build import SAM_SPECS, build_sam_from_spec
from service.engine.auto_routing import DomainEntry, RouterState, read_domain_entry
from service.engine.errors import AdapterRejectedError, UnknownAdapterError
from service.engine.segmentation import SegmentationEngine
from service.engine.slots import check_adapter_files
from service.engine.stats import SwapResult

__all__ = ["DomainAdapters", "LiveFollower", "RouterFollower", "check_adapter_fits"]

logger = logging.getLogger(__name__)


def check_adapter_fits(model: str, files: AdapterFiles, source: str) -> None:
    """Refuse an adapter the serving model could not load, without touching that model.

    The engine's own checks (:func:`service.engine.slots.check_adapter_files`: a plain LoRA config
    whose targets all lie in the image encoder, finite float weights) run against a copy of
    the architecture on the ``meta`` device - no memory, no weights - and the weights' keys
    and shapes are compared with what PEFT would create there. Raises AdapterRejectedError.
    """
    with torch.device("meta"):
        sam = build_sam_from_spec(SAM_SPECS[model])
    config = check_adapter_files(sam, files, source)
    try:
        with torch.device("meta"):  # the LoRA layers PEFT creates land there too
            peft_model = get_peft_model(sam, config)
    except Exception as exc:  # PEFT refuses layer types, ranks, ... with many kinds
        raise AdapterRejectedError(f"{source}: PEFT cannot add this adapter: {exc}") from exc
    try:
        check_weights(peft_model, files.weights, source)
    except AdapterError as exc:
        raise AdapterRejectedError(str(exc)) from exc


class SwapMetrics(Protocol):
    """Where the follower counts its swaps (:class:`service.api.metrics.Metrics` is one):
    prometheus-client's Counter and Histograms."""

    swap_failures: Any
    swap_seconds: Any
    swap_paused_seconds: Any


class LiveFollower:
    """Serves the version the registry's live pointer names (see the module docstring)."""

    def __init__(self, engine: SegmentationEngine, registry: Registry, cache_dir: Path,
                 metrics: SwapMetrics) -> None:
        self._engine = engine
        self._registry = registry
        self._cache_dir = cache_dir
        self._metrics = metrics
        self._lock = threading.Lock()
        self._subscription: LiveSubscription | None = None
        self.last_error: str | None = None
        engine.adapters.pointer = registry.live_version  # re-read while a version is pending
        self.listeners: list[Callable[[], None]] = []  # called after each live notice

    def sync(self) -> SwapResult | None:
        """Load the version the pointer names if it is not served yet; the swap, or None when
        nothing changed. Raises what fetching or loading raised: the old version keeps
        serving, and a process that serves none yet and could not reach the artifact store
        refuses ``live`` requests until it loads (``adapters.live_pending``; they would
        otherwise get the base model's masks while the other replicas serve the version)."""
        with self._lock:
            adapters = self._engine.adapters
            version = self._registry.live_version()
            if version is None or version == adapters.live_version:
                adapters.live_pending = None
                return None
            start = time.perf_counter()
            try:
                files = self.read_version(version)
                result = adapters.load_live(version, files)
            except Exception as exc:
                self._metrics.swap_failures.inc()
                self.last_error = f"version {version}: {exc}"
                if adapters.live_version is None:  # nothing live to keep serving meanwhile
                    # The store away: refuse ``live`` until it is back (a few seconds, say).
                    # A version that cannot load for good (files missing, another store):
                    # ``live`` stays the base model, labelled so, as before.
                    adapters.live_pending = version if isinstance(exc, StoreUnavailable) \
                        else None
                raise
            adapters.live_pending = None
            self.last_error = None
            self._metrics.swap_seconds.observe(time.perf_counter() - start)
            self._metrics.swap_paused_seconds.observe(result.locked_seconds)
            logger.info("serving live version %d (was %s; %.3f s end to end)", version,
                        result.previous_version, time.perf_counter() - start)
            return result

    def read_version(self, version: int) -> AdapterFiles:
        """Version ``version``'s adapter, fetched into the cache and read (not yet checked)."""
        record = self._registry.get_version(version)
        path = self._registry.fetch_version(version, self._cache_dir)
        return read_adapter(path / record.adapter_dir)

    def _on_notice(self, version: int) -> None:
        """Raises when the version could not be served (the previous one stays live); the
        subscription then tries again at its next resync. The listeners (the domain router's
        re-check) run either way."""
        try:
            self.sync()
        finally:
            for listener in self.listeners:
                listener()

    def start(self) -> None:
        """Follow the pointer from now on (a listener thread that survives Redis restarts)."""
        if self._subscription is None:
            self._subscription = self._registry.subscribe_live(self._on_notice)

    def stop(self) -> None:
        if self._subscription is not None:
            self._subscription.stop()
            self._subscription = None


class DomainAdapters:
    """The registry as the engine's :class:`~service.engine.adapter_table.DomainSource`: a request
    naming an uploaded adapter gets it loaded (and loaded again after a new upload under that
    name). Which adapters are loaded is the engine's to know, not this class's."""

    def __init__(self, registry: Registry, cache_dir: Path) -> None:
        self._registry = registry
        self._cache_dir = cache_dir

    def revision(self, name: str) -> str:
        """The sha256 of the registry's copy of ``name``; UnknownAdapterError if none."""
        try:
            return self._registry.get_adapter(name).sha256
        except (NotFound, InvalidName) as exc:
            raise UnknownAdapterError(
                f"unknown adapter {name!r}: use 'live', 'base' or an uploaded adapter's "
                "name") from exc

    def files(self, name: str) -> AdapterFiles:
        """Adapter ``name``, fetched into the cache and read (the engine checks it)."""
        return read_adapter(self._registry.fetch_adapter(name, self._cache_dir))


class RouterFollower:
    """Keeps the engine's domain router in step with the registry (see the module docstring).

    An adapter whose statistics cannot route (missing, malformed, another layer or width) is
    listed as skipped with the reason; one that vanished mid-sync is picked up next time. The
    statistics are read from the local copies of the adapters (fetched once per sha256), only
    the router's three tensors of each, and kept nowhere but in the router.
    """

    def __init__(self, engine: SegmentationEngine, registry: Registry, cache_dir: Path) -> None:
        self._engine = engine
        self._registry = registry
        self._cache_dir = cache_dir
        self._lock = threading.Lock()
        self._signature: object = None  # (name, sha256) of what the served router was built from
        self._subscription: LiveSubscription | None = None

    def sync(self) -> RouterState:
        """Re-list the registry and rebuild the router if its adapters changed."""
        with self._lock:
            records = sorted((r for r in self._registry.list_adapters() if r.has_stats),
                             key=lambda r: r.name)
            signature = [(r.name, r.sha256) for r in records]
            if signature == self._signature:
                return self._engine.routing.state
            entries: list[DomainEntry] = []
            skipped: dict[str, str] = {}
            for record in records:
                try:
                    path = self._registry.fetch_adapter(record.name, self._cache_dir)
                    entries.append(read_domain_entry(path / STATS_FILE, record.name,
                                                     record.sha256))
                except NotFound:
                    continue  # deleted meanwhile: its own notice follows
                except StoreUnavailable:
                    raise  # the previous router serves; the next notice or resync tries again
                except (RoutingError, OSError, ValueError) as exc:
                    skipped[record.name] = f"its statistics cannot route: {exc}"
            self._signature = signature
            return self._engine.routing.replace(entries, skipped)

    def _on_notice(self, _: int = 0) -> None:
        """Raises only when the artifact store is away, so that the subscription tries again
        at its next resync (the previous router serves meanwhile)."""
        try:
            self.sync()
        except StoreUnavailable as exc:
            logger.warning("could not rebuild the domain router (%s); the previous one "
                           "serves, trying again at the next resync", exc)
            raise
        except Exception:
            logger.exception("could not rebuild the domain router; the previous one serves")

    def start(self, live: LiveFollower | None = None) -> None:
        """Follow the registry's adapters from now on (and each live notice of ``live``)."""
        if self._subscription is None:
            self._subscription = self._registry.subscribe_adapters(self._on_notice)
            if live is not None:
                live.listeners.append(self._on_notice)

    def stop(self) -> None:
        if self._subscription is not None:
            self._subscription.stop()
            self._subscription = None
