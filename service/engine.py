"""The serving engine: one SAM with its LoRA adapters, an embedding cache, and hot swaps.

A thin façade over one room per concern, which the routes and tests call:

- :mod:`service.image_store`: uploaded images by content hash, byte-bounded.
- :mod:`service.adapter_table`: the adapter slots of the one PEFT-wrapped SAM - the live
  adapter, the domain adapters loaded (its one owner: a request pins the slot it encodes
  with, eviction skips pinned slots, a domain not loaded is loaded from the registry when
  named), hot swaps, and the model lock.
- :mod:`service.encoding`: the embedding cache, else batched encodes with the adapter folded
  into a private serving copy of the encoder.
- :mod:`service.decoding`: the one decode path; every prompt of every route goes through
  its decoder thread, in one mask-decoder call per prompt form.
- :mod:`service.engine_stats`: swap records and the counters' snapshot for metrics.

Hot swap: :meth:`SegmentationEngine.load_live` checks the new adapter, loads it into a new
slot and moves the live pointer under the model lock, then deletes the old slot. Embeddings
are cached under the slot's unique key, so a request that already encoded keeps its embedding
and reports the version it used; the next encode of ``live`` uses the new one; none fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam

from regcl.adapters import AdapterFiles
from regcl.data.images import DEFAULT_MAX_PIXELS
from regcl.errors import ConfigError
from regcl.models.serving import ServingEncoder
from service.adapter_table import (
    BASE,
    DEFAULT_MAX_DOMAINS,
    LIVE,
    AdapterTable,
    DomainSource,
)
from service.batching import BatchStats
from service.cache import EmbeddingCache, EncodedImage
from service.decoding import DecodeJob, PromptDecoder, SegmentResult
from service.encoding import ImageEncoding
from service.engine_stats import EngineStats, SwapResult
from service.image_store import DEFAULT_IMAGE_STORE_BYTES, ImageStore, image_id_of
from service.options import ServingOptions, encoder_buckets
from service.prompts import DEFAULT_MAX_POINTS, Prompt, check_bounds, check_prompt
from service.slots import AdapterSlot

__all__ = ["BASE", "LIVE", "EngineStats", "SegmentResult", "SegmentationEngine", "ServingOptions",
           "SwapResult", "image_id_of"]


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
            (:class:`~service.options.ServingOptions`; default: CPU, float32, no compile,
            batches of 8).
        domain_source: where a domain adapter named by a request but not loaded comes from
            (the server's registry); None: only :meth:`load_domain` loads them.
    """

    def __init__(self, sam: Sam, cache_bytes: int, *,
                 image_store_bytes: int = DEFAULT_IMAGE_STORE_BYTES,
                 max_domains: int = DEFAULT_MAX_DOMAINS,
                 max_points: int = DEFAULT_MAX_POINTS,
                 options: ServingOptions | None = None,
                 domain_source: DomainSource | None = None) -> None:
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
                                 buckets=encoder_buckets(self.options.max_batch))
        self.max_points = max_points
        self.images = ImageStore(image_store_bytes)
        self.cache = EmbeddingCache(cache_bytes)
        self.slots = AdapterTable(sam, self.cache, max_domains=max_domains,
                                  source=domain_source)
        self._encoding = ImageEncoding(encoder, self.slots, self.cache, self.images,
                                       self.options)
        self._decoder = PromptDecoder(self.slots.sam, self.options.max_decode_batch)
        self._mask_input_size = tuple(self.slots.sam.prompt_encoder.mask_input_size)

    def close(self) -> None:
        """Stop the batching threads (after the work already queued)."""
        self._encoding.close()
        self._decoder.close()

    # ----------------------------------------------------------------------------- images
    def register_image(self, image: np.ndarray) -> str:
        """Store an H x W x 3 uint8 RGB image; returns its id (a content hash). See
        :meth:`service.image_store.ImageStore.register`."""
        return self.images.register(image)

    def register_image_bytes(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
        """Decode an uploaded PNG/JPEG/... (DataError if it is not one) and register it."""
        return self.images.register_bytes(data, max_pixels)

    def has_image(self, image_id: str) -> bool:
        return image_id in self.images

    def image(self, image_id: str) -> np.ndarray | None:
        """The stored H x W x 3 uint8 image (read-only), or None if it is not (any more)."""
        return self.images.peek(image_id)

    def forget_image(self, image_id: str) -> bool:
        """Drop an image and all its embeddings; returns whether anything was stored."""
        dropped = self.cache.drop_where(lambda key: key[0] == image_id)
        return self.images.pop(image_id) or dropped > 0

    # ----------------------------------------------------------------------------- inference
    def encode(self, image_id: str, adapter: str = LIVE) -> tuple[EncodedImage, str]:
        """The image's embedding under ``adapter`` (``base``, ``live`` or a domain), from the
        cache or computed as ``SamPredictor.set_image`` does. Returns it and the adapter
        version label that made it."""
        with self.slots.use(adapter) as target:
            encoded, _ = self._encoding.encode(image_id, target)
        return encoded, encoded.adapter_version

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
                ``adapter_version`` then says ``base``) or a domain adapter's name.
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
        with self.slots.use(adapter) as target:  # an unknown adapter fails before any work
            checked = [self._check_prompt(p.get("point_coords"), p.get("point_labels"),
                                          p.get("box"), p.get("mask_input")) for p in prompts]
            if not checked:
                return []
            size = self.images.size_of(image_id)
            if size is not None:  # before paying for an encode
                for prompt in checked:
                    check_bounds(prompt, size)
            encoded, hit = self._encoding.encode(image_id, target)
        return self._decode([DecodeJob(encoded, p, bool(multimask), hit) for p in checked])

    def decode(self, encoded: EncodedImage, point_coords: object = None,
               point_labels: object = None, box: object = None, mask_input: object = None,
               multimask: bool = True) -> SegmentResult:
        """Segment with an embedding from :meth:`encode` (still valid after a swap; the result
        reports the version that made it). Arguments as in :meth:`segment`."""
        prompt = self._check_prompt(point_coords, point_labels, box, mask_input)
        return self._decode([DecodeJob(encoded, prompt, bool(multimask), True)])[0]

    def _decode(self, jobs: list[DecodeJob]) -> list[SegmentResult]:
        for job in jobs:
            check_bounds(job.prompt, job.encoded.original_size)
        return self._decoder.decode(jobs)

    def _check_prompt(self, point_coords: object, point_labels: object, box: object,
                      mask_input: object) -> Prompt:
        return check_prompt(point_coords, point_labels, box, mask_input,
                            mask_input_size=self._mask_input_size, max_points=self.max_points)

    @property
    def serving_encoder(self) -> ServingEncoder:
        """The encoder that runs (its ``compiles`` counter, device, dtype)."""
        return self._encoding.encoder

    @property
    def batch_stats(self) -> BatchStats:
        """Encoder batches so far (count, images, largest): :class:`service.batching.BatchStats`."""
        return self._encoding.batch_stats

    # ----------------------------------------------------------------------------- adapters
    def load_live(self, version: int, files: AdapterFiles, *, force: bool = False
                  ) -> SwapResult:
        """Serve ``files`` as live adapter ``version``
        (:meth:`service.adapter_table.AdapterTable.load_live`)."""
        return self.slots.load_live(version, files, force=force)

    def clear_live(self) -> int | None:
        """Stop serving a live adapter (``live`` becomes base); returns the version removed."""
        return self.slots.clear_live()

    def load_domain(self, name: str, files: AdapterFiles) -> AdapterSlot:
        """Serve ``files`` as domain adapter ``name`` (replacing a loaded one of that name)."""
        return self.slots.load_domain(name, files)

    def unload_domain(self, name: str, *, missing_ok: bool = False) -> bool:
        """Stop serving domain adapter ``name``; UnknownAdapterError if it is not loaded,
        unless ``missing_ok``."""
        return self.slots.unload_domain(name, missing_ok=missing_ok)

    def domains(self) -> list[str]:
        """Loaded domain adapters, least recently used first."""
        return self.slots.domains()

    def adapters(self) -> list[AdapterSlot]:
        """Every adapter being served: the live one (if any), then the domains."""
        return self.slots.adapters()

    @property
    def live_version(self) -> int | None:
        """The live adapter's version; None when ``live`` means the base model."""
        return self.slots.live_version

    @property
    def live_label(self) -> str:
        """What a ``live`` request reports now: ``live:<version>`` or ``base``."""
        return self.slots.live_label

    @property
    def base_fingerprint(self) -> str:
        """``regcl.models.model_fingerprint`` of the base weights (computed once)."""
        return self.slots.base_fingerprint

    # ----------------------------------------------------------------------------- metrics
    def swap_history(self) -> list[SwapResult]:
        """The most recent swaps (up to 64), oldest first."""
        return self.slots.swaps.recent()

    def stats(self) -> EngineStats:
        last, swaps = self.slots.swaps.last()
        return EngineStats(self.cache.stats(), self.images.stats(), self.live_version,
                           tuple(self.domains()), self._encoding.encodes, swaps, last,
                           self.slots.domain_loads)
