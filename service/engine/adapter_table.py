"""The adapter slot table: which adapters the serving encoder holds, and who is using them.

Every adapter served (the live one, each loaded domain) is a slot: PEFT checks and loads its
files into the one PEFT-wrapped model (:mod:`service.engine.slots`), its LoRA factors are
copied into the serving encoder's bank (:class:`~regcl.models.lora_bank.LoraBank`, where
batches apply each image's own adapter) and the PEFT copy is deleted again, so an adapter is
held once, as its factors. :class:`AdapterTable` is the one owner of that set: nothing else
records which adapters are loaded.

Locks
    - ``lock`` (the model lock, a :class:`~service.engine.batching.WriterFirstLock`) guards the
      PEFT model, the encoder's bank and its folded weights: adding and removing slots here,
      running the encoder in :mod:`service.engine.encode`. A writer goes before the encoder's
      next batch, so a swap waits one batch at most. Which adapter a batch's images use is no
      longer model-global state (each image carries its own), so batches never split by adapter.
    - a plain lock guards the table itself for a moment at a time; when both are taken the
      model lock comes first.

Live
    ``live`` is resolved when the encoder's batch runs (under the model lock), so a request
    queued before a swap encodes with the new version and none fails. The old slot is removed
    under the model lock and its embeddings dropped after it.

Domains
    - At most ``max_domains`` are loaded (a slot is its LoRA factors: 90 KiB for the tiny
      SAM's default adapter, 600 KiB for vit_b's); loading one more unloads the least
      recently used one *that no request is using*.
    - A request pins the domain slot it encodes with (:meth:`AdapterTable.use`), from naming
      it to the end of its encode: a pinned slot is never removed (an unload or a reload of
      that name waits for the last pin), so a request never loses its adapter half-way.
    - When every loaded slot is pinned, a load goes over ``max_domains`` for as long as the
      pins last; the release of the last pin brings the table back to ``max_domains``.
    - With a :class:`DomainSource` (the server's registry), a domain that is not loaded
      (never, or evicted) is loaded from it when a request names it, and loaded again when
      the source's revision of that name changed. ``auto`` names a domain with the router's
      revision of it: a slot loaded at that revision serves without asking the source (one
      registry read per request less); another revision asks, as a request naming it does.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol

from peft import LoraConfig
from segment_anything.modeling import Sam

from infra.names import AUTO, BASE, LIVE, validate_name
from regcl.adapters import AdapterConfig, AdapterFiles, attach_lora, unwrap
from regcl.errors import ConfigError
from regcl.models import model_fingerprint
from regcl.models.lora_bank import lora_factors
from regcl.models.serving import ServingEncoder
from service.engine.batching import WriterFirstLock
from service.engine.caches import EmbeddingCache
from service.engine.errors import (
    AdapterRejectedError,
    LiveUnavailableError,
    UnknownAdapterError,
)
from service.engine.slots import AdapterSlot, add_slot, check_adapter_files, remove_slot
from service.engine.stats import SwapLog, SwapResult

__all__ = ["AUTO", "BASE", "DEFAULT_MAX_DOMAINS", "LIVE", "AdapterTable", "DomainSource", "Target",
           "slot_key", "slot_label"]

logger = logging.getLogger(__name__)

# BASE: the model without any adapter (its version label too); LIVE: the current merged
# adapter (label ``live:<version>``); AUTO: the domain router chooses a domain, else live
# (:mod:`service.engine.auto_routing`). The names are reserved (:mod:`infra.names`).
DEFAULT_MAX_DOMAINS = 64

Target = AdapterSlot | str | None
"""What a request encodes with: None (base), :data:`LIVE` (resolved when the batch runs) or a
pinned domain slot."""


def slot_key(slot: AdapterSlot | None) -> str:
    """The embedding cache's adapter key: the slot's unique key, or ``base``."""
    return BASE if slot is None else slot.key


def slot_label(slot: AdapterSlot | None) -> str:
    """What a response reports: ``live:3``, ``domain:polyp`` or ``base``."""
    return BASE if slot is None else slot.label


class DomainSource(Protocol):
    """Where domain adapters come from when a request names one that is not loaded."""

    def revision(self, name: str) -> str:
        """The current revision (a content hash) of adapter ``name``; raises
        UnknownAdapterError if there is none of that name."""
        ...

    def files(self, name: str) -> AdapterFiles:
        """Adapter ``name``'s files, read (not yet checked)."""
        ...


class AdapterTable:
    """The slots of one PEFT-wrapped SAM (see the module docstring).

    Args:
        sam: the base model, wrapped **in place** by PEFT.
        encoder: the serving encoder whose bank holds the slots' LoRA factors.
        cache: the embedding cache, whose entries of a removed slot are dropped.
        max_domains: domain adapters kept loaded (see the module docstring).
        source: loads domain adapters on demand; None: only :meth:`load_domain` loads them.
    """

    def __init__(self, sam: Sam, encoder: ServingEncoder, cache: EmbeddingCache, *,
                 max_domains: int = DEFAULT_MAX_DOMAINS,
                 source: DomainSource | None = None) -> None:
        if max_domains < 0:
            raise ConfigError(f"need max_domains >= 0, got {max_domains}")
        self.model = attach_lora(sam, AdapterConfig(rank=1))  # placeholder, never active
        self.model.eval()
        self.sam: Sam = unwrap(self.model)
        self.encoder = encoder
        self.lock = WriterFirstLock()
        self.max_domains = max_domains
        self.swaps = SwapLog()
        self.domain_loads = 0
        self._cache = cache
        self._source = source
        self._state = threading.Lock()
        self._loading = threading.Lock()  # one load from the source at a time
        self._live: AdapterSlot | None = None
        # The version the live pointer names while this process could not load it and
        # serves none: ``live`` requests are refused (LiveUnavailableError) until it loads,
        # or until ``pointer()`` (the live follower's, a Redis read) says it names none now.
        self.live_pending: int | None = None
        self.pointer: Callable[[], int | None] | None = None
        self._domains: OrderedDict[str, AdapterSlot] = OrderedDict()  # LRU first
        self._pins: Counter[str] = Counter()  # slot key -> requests encoding with it
        self._retired: dict[str, AdapterSlot] = {}  # unloaded or replaced, still pinned
        self._slot_ids = itertools.count(1)
        self._fingerprint: str | None = None

    # ----------------------------------------------------------------------------- requests
    def resolve(self, adapter: str) -> AdapterSlot | None:
        """``base`` → None, ``live`` → the live slot (None: base), a loaded domain → its slot
        (now the most recently used). Raises UnknownAdapterError otherwise. Pins nothing."""
        if adapter == BASE:
            return None
        with self._state:
            if adapter == LIVE:
                return self._live
            slot = self._domains.get(adapter) if isinstance(adapter, str) else None
            if slot is None:
                raise UnknownAdapterError(f"unknown adapter {adapter!r}; loaded: "
                                          f"{[BASE, LIVE, *self._domains]}")
            self._domains.move_to_end(adapter)
            return slot

    def _still_pending(self) -> bool:
        """Whether a live version this process could not load is still the pointer's (a
        pointer removed since, e.g. Redis emptied, releases ``live`` to the base model)."""
        if self.live_pending is None:
            return False
        if self.pointer is not None and self.pointer() is None:
            self.live_pending = None
            return False
        return True

    @contextlib.contextmanager
    def use(self, adapter: str, revision: str | None = None) -> Iterator[Target]:
        """What a request naming ``adapter`` encodes with, for the duration of the block:
        None (base), :data:`LIVE`, or the domain's slot, pinned (loaded from the source first
        if need be). ``revision``: the domain's revision as the caller knows it (``auto``:
        the router's); a slot loaded at that revision serves without asking the source.
        Raises UnknownAdapterError for a name neither loaded nor in the source."""
        if adapter in (BASE, LIVE):
            if adapter == LIVE and self._live is None and self._still_pending():
                raise LiveUnavailableError(
                    f"live version {self.live_pending} is not loaded in this process yet (its "
                    "files could not be fetched); try again shortly, or name 'base' or an "
                    "adapter")
            yield None if adapter == BASE else LIVE
            return
        slot = self._acquire(adapter, revision)
        try:
            yield slot
        finally:
            self._release(slot)

    def _acquire(self, name: str, known: str | None = None) -> AdapterSlot:
        if known is not None and self._source is not None:
            slot = self._pin_loaded(name, known)
            if slot is not None:
                return slot
        revision = None if self._source is None else self._source.revision(name)
        slot = self._pin_loaded(name, revision)
        if slot is not None:
            return slot
        if self._source is None:
            raise UnknownAdapterError(f"unknown adapter {name!r}; loaded: "
                                      f"{[BASE, LIVE, *self.domains()]}")
        with self._loading:  # a request that waited here finds the name loaded
            slot = self._pin_loaded(name, revision)
            if slot is not None:
                return slot
            return self.load_domain(name, self._source.files(name), revision=revision,
                                    pinned=True)

    def _pin_loaded(self, name: str, revision: str | None) -> AdapterSlot | None:
        with self._state:
            slot = self._domains.get(name) if isinstance(name, str) else None
            if slot is None or (self._source is not None and slot.revision != revision):
                return None
            self._domains.move_to_end(name)
            self._pins[slot.key] += 1
            return slot

    def _release(self, slot: AdapterSlot) -> None:
        with self._state:
            self._pins[slot.key] -= 1
            if self._pins[slot.key] <= 0:
                del self._pins[slot.key]
            due = slot.key in self._retired or len(self._domains) > self.max_domains
        if due:
            with self.lock:
                self._remove_unused()

    def deltas(self, slot: AdapterSlot | None) -> dict | None:
        """What to fold into a compiled serving encoder for ``slot`` (None: none): ``ΔW`` per
        layer from the slot's factors. Caller holds the model lock."""
        if slot is None:
            return None
        self._check_resident(slot)
        return self.encoder.delta_weights(slot.key)

    def _check_resident(self, slot: AdapterSlot) -> None:
        if slot.key not in self.encoder.bank:  # never with pins; never serve base instead
            raise RuntimeError(f"adapter slot {slot.key} ({slot.label}) was removed in use")

    def encoder_key(self, slot: AdapterSlot | None) -> str | None:
        """The encoder bank's key for ``slot`` (None: base), for a mixed forward. Caller holds
        the model lock."""
        if slot is None:
            return None
        self._check_resident(slot)
        return slot.key

    # ----------------------------------------------------------------------------- changes
    def _new_slot(self, kind: str, name: str, version: int | None, files: AdapterFiles,
                  revision: str | None = None) -> AdapterSlot:
        label = f"live:{version}" if kind == LIVE else f"domain:{name}"
        return AdapterSlot(f"slot{next(self._slot_ids)}", label, kind, name, version,
                           str(files.path), time.time(), revision)

    def _add_slot(self, slot: AdapterSlot, config: LoraConfig, files: AdapterFiles,
                  source: str) -> None:
        """add_slot (PEFT checks and loads the files), copy the adapter's LoRA factors into the
        encoder's bank (refused unless every layer is plain LoRA on a linear: not DoRA), then
        delete the PEFT copy. Caller holds the model lock."""
        add_slot(self.model, slot.key, config, files, source)
        try:
            factors = lora_factors(self.sam.image_encoder, slot.key)
            self.encoder.add_adapter(slot.key, factors)
        except ConfigError as exc:
            raise AdapterRejectedError(f"{source}: {exc}") from exc
        finally:
            remove_slot(self.model, slot.key)

    def _drop_slot(self, slot: AdapterSlot) -> None:
        """Remove ``slot``'s factors from the encoder. Caller holds the model lock."""
        self.encoder.remove_adapter(slot.key)

    def _remove_unused(self) -> list[AdapterSlot]:
        """Remove the retired slots nobody uses and the least recently used unused domains
        beyond ``max_domains``, with their embeddings. Caller holds the model lock."""
        with self._state:
            doomed = [slot for key, slot in self._retired.items() if not self._pins[key]]
            for slot in doomed:
                del self._retired[slot.key]
            over = len(self._domains) - self.max_domains
            for name, slot in list(self._domains.items()):
                if over <= 0:
                    break
                if not self._pins[slot.key]:
                    del self._domains[name]
                    doomed.append(slot)
                    over -= 1
                    logger.info("unloaded domain adapter %r (least recently used)", name)
        for slot in doomed:
            self._drop_slot(slot)
            self._cache.drop_adapter(slot.key)
        return doomed

    def load_live(self, version: int, files: AdapterFiles, *, force: bool = False
                  ) -> SwapResult:
        """Serve ``files`` as live adapter ``version``: check it, load it into a new slot,
        switch ``live`` to it atomically, delete the old slot and its embeddings.

        Loading the version that is live already does nothing (``swapped=False``) unless
        ``force``. Raises AdapterRejectedError (live unchanged) for an adapter that does not
        fit or could touch more than the image encoder.
        """
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ConfigError(f"live version must be an int >= 0, got {version!r}")
        start = time.perf_counter()
        source = f"live adapter v{version} ({files.path})"
        config = check_adapter_files(self.sam, files, source)
        with self.lock:
            locked = time.perf_counter()
            previous = self._live
            if previous is not None and previous.version == version and not force:
                return SwapResult(version, version, time.perf_counter() - start, 0.0, 0,
                                  swapped=False)
            slot = self._new_slot(LIVE, LIVE, version, files)
            self._add_slot(slot, config, files, source)
            with self._state:
                self._live = slot
            if previous is not None:
                self._drop_slot(previous)
            locked_seconds = time.perf_counter() - locked
        dropped = self._cache.drop_adapter(previous.key) if previous is not None else 0
        result = SwapResult(version, previous.version if previous else None,
                            time.perf_counter() - start, locked_seconds, dropped)
        self.swaps.add(result)
        logger.info("live adapter v%s -> v%s in %.3f s (encoding paused %.3f s, %d embeddings "
                    "dropped)", result.previous_version, version, result.seconds,
                    locked_seconds, dropped)
        return result

    def clear_live(self) -> int | None:
        """Stop serving a live adapter (``live`` becomes base); returns the version removed."""
        with self.lock:
            with self._state:
                previous, self._live = self._live, None
            if previous is not None:
                self._drop_slot(previous)
        if previous is None:
            return None
        self._cache.drop_adapter(previous.key)
        return previous.version

    def load_domain(self, name: str, files: AdapterFiles, *, revision: str | None = None,
                    pinned: bool = False) -> AdapterSlot:
        """Serve ``files`` as domain adapter ``name`` (replacing a loaded one of that name),
        pinned once if ``pinned``. Unloads the least recently used unused domains beyond
        ``max_domains``."""
        validate_name(name, "domain adapter name", new=True)
        if self.max_domains == 0:
            raise ConfigError("this engine serves no domain adapters (max_domains=0)")
        source = f"domain adapter {name!r} ({files.path})"
        config = check_adapter_files(self.sam, files, source)
        with self.lock:
            slot = self._new_slot("domain", name, None, files, revision)
            self._add_slot(slot, config, files, source)
            with self._state:
                old = self._domains.pop(name, None)
                if old is not None:
                    self._retired[old.key] = old
                self._domains[name] = slot
                self.domain_loads += 1
                if pinned:
                    self._pins[slot.key] += 1
            self._remove_unused()
        return slot

    def unload_domain(self, name: str, *, missing_ok: bool = False) -> bool:
        """Stop serving domain adapter ``name`` (its slot goes once no request uses it);
        returns whether it was loaded. UnknownAdapterError if not, unless ``missing_ok``."""
        with self.lock:
            with self._state:
                slot = self._domains.pop(name, None) if isinstance(name, str) else None
                if slot is not None:
                    self._retired[slot.key] = slot
            self._remove_unused()
        if slot is None and not missing_ok:
            raise UnknownAdapterError(f"domain adapter {name!r} is not loaded")
        return slot is not None

    # ----------------------------------------------------------------------------- reading
    def domains(self) -> list[str]:
        """Loaded domain adapters, least recently used first."""
        with self._state:
            return list(self._domains)

    def revision_of(self, name: str) -> str | None:
        """The content hash of domain adapter ``name`` as loaded (None: not loaded, or loaded
        from files rather than the registry)."""
        with self._state:
            slot = self._domains.get(name)
            return None if slot is None else slot.revision

    def served(self) -> list[AdapterSlot]:
        """Every adapter being served: the live one (if any), then the domains."""
        with self._state:
            return ([self._live] if self._live else []) + list(self._domains.values())

    def pinned(self) -> int:
        """Requests encoding with a domain slot right now."""
        with self._state:
            return sum(self._pins.values())

    @property
    def live_version(self) -> int | None:
        """The live adapter's version; None when ``live`` means the base model."""
        live = self._live
        return None if live is None else live.version

    @property
    def live_label(self) -> str:
        """What a ``live`` request reports now: ``live:<version>`` or ``base``."""
        return slot_label(self._live)

    @property
    def base_fingerprint(self) -> str:
        """``regcl.models.model_fingerprint`` of the base weights (computed once), to compare
        with the base model an adapter was trained on before loading it."""
        if self._fingerprint is None:
            with self.lock:
                self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint
