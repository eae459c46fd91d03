"""The serving engine: one SAM with its LoRA adapters, an embedding cache, and hot swaps.

:class:`SegmentationEngine` takes a request from its prompt to masks; its parts are public
and callers use them directly:

- ``images`` (:mod:`service.engine.image_store`): uploaded images by content hash,
  byte-bounded.
- ``adapters`` (:mod:`service.engine.adapter_table`): the adapter slots of the one
  PEFT-wrapped SAM - the live adapter, the domain adapters loaded (its one owner: a request
  pins the slot it encodes with, eviction skips pinned slots, a domain not loaded is loaded
  from the registry when named), hot swaps, and the model lock.
- ``encoding`` (:mod:`service.engine.encode`): the embedding cache, else batched encodes in a
  private serving copy of the encoder, each image with its own adapter in one forward.
- ``cache`` (:mod:`service.engine.caches`): the embeddings, by image and adapter slot.
- ``encoding.store`` (:mod:`service.engine.embedding_store`, set by :meth:`SegmentationEngine.
  use_store`): embeddings persisted in the artifact store by a pre-encode (:meth:`persist`),
  which every API process reads on a cache miss before it encodes.
- ``routing`` (:mod:`service.engine.auto_routing`): ``adapter: "auto"``, the router over the
  registered domain adapters' statistics (kept in step with the registry by
  :class:`service.engine.live_swap.RouterFollower`).

The decoder (:mod:`service.engine.decode`) is the one decode path: every prompt of every route
goes through its thread, in one mask-decoder call per prompt form.

A request's path (``segment``): check the prompts (:mod:`service.engine.prompt_checks`), pin
the adapter's slot (``adapters.use``), take the embedding from the cache, else the embedding
store, else queue the image for the encoder's batch thread (``encoding.encode``), then queue
the prompts for the decoder's batch thread (``decode``) and wait for the masks.

``auto``: the encoder runs up to the router's block once (no adapter there), the router picks
a domain from those tokens (or none: not confident, or unlike every domain), and the encode is
finished from the same tokens with the chosen domain's adapter, else with ``live``. The
embedding is cached as that adapter's, so a later request naming it directly gets the same
one; each image's route is remembered until the router changes.

Hot swap: ``adapters.load_live`` checks the new adapter, loads it into a new slot and moves
the live pointer under the model lock, then deletes the old slot. Embeddings are cached under
the slot's unique key, so a request that already encoded keeps its embedding and reports the
version it used; the next encode of ``live`` uses the new one; none fails.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam

from regcl.errors import ConfigError
from regcl.models.serving import ServingEncoder
from regcl.routing import (
    DEFAULT_MAX_DIVERGENCE,
    DEFAULT_MIN_MARGIN,
    first_layer_moments,
    tokens_per_image,
)
from service.engine.adapter_table import (
    BASE,
    DEFAULT_MAX_DOMAINS,
    LIVE,
    AdapterTable,
    DomainSource,
    slot_key,
    slot_label,
)
from service.engine.auto_routing import AUTO, AutoRoute, DomainRouting
from service.engine.caches import EmbeddingCache, EncodedImage
from service.engine.decode import DecodeJob, PromptDecoder, SegmentResult
from service.engine.embedding_store import EmbeddingStore, version_id
from service.engine.encode import ImageEncoding, RouterPrefix
from service.engine.errors import NonFiniteOutputError, UnknownAdapterError
from service.engine.image_store import DEFAULT_IMAGE_STORE_BYTES, ImageStore, image_id_of
from service.engine.options import ServingOptions, encoder_buckets
from service.engine.prompt_checks import DEFAULT_MAX_POINTS, Prompt, check_bounds, check_prompt
from service.engine.stats import EngineStats, SwapResult

__all__ = ["AUTO", "BASE", "LIVE", "EngineStats", "Persisted", "SegmentResult",
           "SegmentationEngine", "ServingOptions", "SwapResult", "image_id_of"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Persisted:
    """What :meth:`SegmentationEngine.persist` did for one image: the adapter version,
    the bytes its embedding takes in the store (0: not stored), whether it was written now,
    and whether the encoder ran for it."""

    adapter_version: str
    nbytes: int
    written: bool
    encoded: bool


class SegmentationEngine:
    """Segments images with a SAM and its LoRA adapters; see the module docstring.

    Args:
        sam: the base model. It is wrapped **in place** by PEFT (its image-encoder linears
            become LoRA layers), so do not use it elsewhere afterwards; move it to its device
            and put it in eval mode before.
        cache_bytes: budget of the embedding cache (sum of embedding tensor bytes).
        image_store_bytes: budget of the uploaded-image store (sum of array bytes).
        max_domains: domain adapters kept loaded; loading one more unloads the least
            recently used that no request is using.
        max_points: most point prompts per request.
        options: device, precision, attention, compile and batching
            (:class:`~service.engine.options.ServingOptions`; default: CPU, float32, no compile,
            batches of 8).
        domain_source: where a domain adapter named by a request but not loaded comes from
            (the server's registry); None: only ``adapters.load_domain`` loads them.
        route_min_margin, route_max_novelty: when ``auto`` takes the router's best domain
            (:class:`~service.engine.auto_routing.DomainRouting`); else it falls back to ``live``.
    """

    def __init__(self, sam: Sam, cache_bytes: int, *,
                 image_store_bytes: int = DEFAULT_IMAGE_STORE_BYTES,
                 max_domains: int = DEFAULT_MAX_DOMAINS,
                 max_points: int = DEFAULT_MAX_POINTS,
                 options: ServingOptions | None = None,
                 domain_source: DomainSource | None = None,
                 route_min_margin: float = DEFAULT_MIN_MARGIN,
                 route_max_novelty: float = DEFAULT_MAX_DIVERGENCE) -> None:
        if not isinstance(sam, Sam):
            raise ConfigError(f"expected an unwrapped segment_anything Sam, got "
                              f"{type(sam).__name__}")
        if max_domains < 0 or max_points < 1:
            raise ConfigError(f"need max_domains >= 0 and max_points >= 1, got {max_domains}, "
                              f"{max_points}")
        self.options = (options or ServingOptions()).resolved()
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        sam.to(self.options.device)
        # A plain copy made before PEFT wraps the model: what actually encodes.
        encoder = ServingEncoder(sam.image_encoder, device=self.options.device,
                                 dtype=self.options.dtype, sdpa=bool(self.options.sdpa),
                                 compile=self.options.compile,
                                 buckets=encoder_buckets(self.options.max_batch),
                                 mixed=self.options.mixed)
        self.max_points = max_points
        self.images = ImageStore(image_store_bytes)
        self.cache = EmbeddingCache(cache_bytes)
        self.adapters = AdapterTable(sam, encoder, self.cache, max_domains=max_domains,
                                     source=domain_source)
        self.encoding = ImageEncoding(encoder, self.adapters, self.cache, self.images,
                                      self.options)
        self._decoder = PromptDecoder(self.adapters.sam, self.options.max_decode_batch,
                                      threads=self.options.threads or torch.get_num_threads())
        self.routing = DomainRouting(
            encoder.module.blocks[0].attn.qkv.in_features, min_margin=route_min_margin,
            max_novelty=route_max_novelty,
            tokens_per_image=lambda block: tokens_per_image(encoder.module, block))
        self._mask_input_size = tuple(self.adapters.sam.prompt_encoder.mask_input_size)
        # Part of every embedding ETag: slot keys are unique within this process only.
        self._instance = secrets.token_hex(4)
        # When a prompt was last decoded (time.monotonic()): background work waits for a pause.
        self.last_request = 0.0

    def close(self) -> None:
        """Stop the batching threads (after the work already queued)."""
        self.encoding.close()
        self._decoder.close()

    # ----------------------------------------------------------------------------- images
    def forget_image(self, image_id: str) -> bool:
        """Drop an image and all its embeddings; returns whether anything was stored."""
        dropped = self.cache.drop_where(lambda key: key[0] == image_id)
        self.routing.forget_image(image_id)
        return self.images.pop(image_id) or dropped > 0

    # ----------------------------------------------------------------------------- inference
    def encode(self, image_id: str, adapter: str = LIVE) -> tuple[EncodedImage, str]:
        """The image's embedding under ``adapter`` (``base``, ``live``, ``auto`` or a domain),
        from the cache or computed as ``SamPredictor.set_image`` does. Returns it and the
        adapter version label that made it."""
        if adapter == AUTO:
            encoded, _, _ = self._encode_auto(image_id)
            return encoded, encoded.adapter_version
        with self.adapters.use(adapter) as target:
            encoded, _ = self.encoding.encode(image_id, target)
        return encoded, encoded.adapter_version

    def use_store(self, store: EmbeddingStore | None) -> None:
        """Read embeddings missing from the cache from ``store`` before encoding (None: stop)."""
        self.encoding.store = store

    def encode_label(self, adapter: str = LIVE) -> str:
        """The version label ``adapter`` (not ``auto``) encodes with now: ``base``,
        ``live:3``, ``domain:polyp`` (a registered domain not loaded is loaded). Raises
        UnknownAdapterError."""
        with self.adapters.use(adapter) as target:
            return slot_label(self.encoding.slot(target))

    def persist(self, image_id: str, adapter: str = LIVE) -> Persisted:
        """Make sure the image's embedding under ``adapter`` (``base``, ``live`` or a domain;
        not ``auto``) is in the embedding store: encoded unless the cache or the store has
        it, then written. Raises ConfigError without a store, UnknownAdapterError,
        ImageNotFoundError."""
        store = self.encoding.store
        if store is None:
            raise ConfigError("this engine has no embedding store")
        if adapter == AUTO:
            raise ConfigError("'auto' chooses per click; pre-encode with a named adapter")
        with self.adapters.use(adapter) as target:
            slot = self.encoding.slot(target)
            version = version_id(slot)
            if version is None:
                return Persisted(slot_label(slot), 0, False, False)
            size = store.size(image_id, version)
            if size is not None:
                return Persisted(slot_label(slot), size, False, False)
            encodes = self.encoding.encodes
            encoded, _ = self.encoding.encode(image_id, target)
            if encoded.adapter_key != slot_key(slot):  # live swapped meanwhile: next time
                return Persisted(encoded.adapter_version, 0, False, True)
            return Persisted(encoded.adapter_version, store.put(encoded, slot), True,
                             self.encoding.encodes > encodes)

    def embedding_etag(self, encoded: EncodedImage) -> str:
        """The HTTP ETag (quoted) of an embedding: its image and adapter weights."""
        return f'"{encoded.image_id}.{encoded.adapter_key}.{self._instance}"'

    def segment(self, image_id: str, point_coords: object = None, point_labels: object = None,
                box: object = None, mask_input: object = None, multimask: bool = True,
                adapter: str = LIVE) -> SegmentResult:
        """Segment a registered image with a prompt, as ``SamPredictor.predict`` does.

        Args:
            point_coords: N x 2 (x, y) pixels of the original image; point_labels: N of
                {0, 1}. box: x0, y0, x1, y1 pixels. mask_input: 1 x h x w low-res logits of
                an earlier result. At least one of points, box, mask_input.
            multimask: three masks for an ambiguous prompt, else one.
            adapter: ``base``, ``live`` (falls back to base when none is live; the result's
                ``adapter_version`` then says ``base``), ``auto`` (the router chooses; the
                result's ``route`` says what it chose) or a domain adapter's name.
        Raises:
            UnknownAdapterError, ImageNotFoundError, or a PromptError subclass.
        """
        prompts = [dict(point_coords=point_coords, point_labels=point_labels, box=box,
                        mask_input=mask_input)]
        return self.segment_many(image_id, prompts, multimask, adapter)[0]

    def segment_many(self, image_id: str, prompts: Sequence[Mapping[str, object]],
                     multimask: bool = True, adapter: str = LIVE) -> list[SegmentResult]:
        """Several prompts on one image: one encode (or cache hit), then the decoder thread
        decodes each group of prompts of the same form in one mask-decoder call.

        Each prompt is a mapping with the keywords of :meth:`segment` (``point_coords``,
        ``point_labels``, ``box``, ``mask_input``). Results come back in the prompts' order.
        """
        if adapter == AUTO:
            return self._segment_auto(image_id, prompts, multimask)
        with self.adapters.use(adapter) as target:  # an unknown adapter fails before any work
            checked = self._checked(image_id, prompts)
            if not checked:
                return []
            encoded, hit = self.encoding.encode(image_id, target)
        return self._decode([DecodeJob(encoded, p, bool(multimask), hit) for p in checked])

    def _checked(self, image_id: str, prompts: Sequence[Mapping[str, object]]) -> list[Prompt]:
        """The prompts checked, and within the image if it is stored (before any encode)."""
        checked = [self.check_prompt(p.get("point_coords"), p.get("point_labels"),
                                      p.get("box"), p.get("mask_input")) for p in prompts]
        size = self.images.size_of(image_id)
        if size is not None:
            for prompt in checked:
                check_bounds(prompt, size)
        return checked

    def _segment_auto(self, image_id: str, prompts: Sequence[Mapping[str, object]],
                      multimask: bool) -> list[SegmentResult]:
        """``adapter: "auto"`` (see the module docstring)."""
        checked = self._checked(image_id, prompts)
        if not checked:
            return []
        encoded, hit, chosen = self._encode_auto(image_id)
        results = self._decode([DecodeJob(encoded, p, bool(multimask), hit) for p in checked])
        return [dataclasses.replace(result, route=chosen) for result in results]

    def _encode_auto(self, image_id: str) -> tuple[EncodedImage, bool, AutoRoute]:
        """The embedding ``auto`` gives the image, whether it was cached, and the route.
        A domain's adapter loaded at the revision the router holds is used without asking
        the registry (a revision the router has not heard of yet is loaded as any request
        naming it would be)."""
        chosen, prefix = self.route(image_id)
        try:
            with self.adapters.use(chosen.adapter, chosen.revision) as target:
                encoded, hit = self.encoding.encode(image_id, target, prefix)
        except UnknownAdapterError:  # deleted since the router was built: the merge serves
            chosen = AutoRoute(LIVE, chosen.route, None)
            with self.adapters.use(LIVE) as target:
                encoded, hit = self.encoding.encode(image_id, target, prefix)
        return encoded, hit, chosen

    def route(self, image_id: str) -> tuple[AutoRoute, RouterPrefix | None]:
        """Where ``auto`` sends the image: the choice and the image's tokens entering the
        router's block with its prepared pixels (None when the route was remembered or
        there is no router)."""
        state = self.routing.state
        block = state.block
        if block is None:
            return AutoRoute(LIVE, None, None), None
        known = self.routing.remembered(image_id, state.generation)
        if known is not None:
            return known, None
        prefix = self.encoding.prefix(image_id, block)
        second, first, _ = first_layer_moments(self.encoding.encoder.module.blocks[block],
                                               prefix.tokens)
        return self.routing.decide(image_id, state, second, first), prefix

    def decode(self, encoded: EncodedImage, point_coords: object = None,
               point_labels: object = None, box: object = None, mask_input: object = None,
               multimask: bool = True) -> SegmentResult:
        """Segment with an embedding from :meth:`encode` (still valid after a swap; the result
        reports the version that made it). Arguments as in :meth:`segment`."""
        prompt = self.check_prompt(point_coords, point_labels, box, mask_input)
        return self._decode([DecodeJob(encoded, prompt, bool(multimask), True)])[0]

    def _decode(self, jobs: list[DecodeJob]) -> list[SegmentResult]:
        self.last_request = time.monotonic()
        for job in jobs:
            check_bounds(job.prompt, job.encoded.original_size)
        try:
            results = self._decoder.decode(jobs)
        finally:
            self.last_request = time.monotonic()
        for result in results:
            if not np.isfinite(result.scores).all():  # never answered as numbers (or null)
                logger.error("non-finite scores from %s", result.adapter_version)
                raise NonFiniteOutputError(f"non-finite scores from {result.adapter_version}")
        return results

    def check_prompt(self, point_coords: object, point_labels: object, box: object,
                     mask_input: object) -> Prompt:
        """One prompt checked against this engine's model and limits (a PromptError subclass
        if it is malformed); its bounds are checked once the image's size is known."""
        return check_prompt(point_coords, point_labels, box, mask_input,
                            mask_input_size=self._mask_input_size, max_points=self.max_points)

    # ----------------------------------------------------------------------------- metrics
    def stats(self) -> EngineStats:
        last, swaps = self.adapters.swaps.last()
        store = self.encoding.store
        return EngineStats(self.cache.stats(), self.images.stats(),
                           self.adapters.live_version, tuple(self.adapters.domains()),
                           self.encoding.encodes, swaps, last, self.adapters.domain_loads,
                           0 if store is None else store.loads,
                           0 if store is None else store.writes)
