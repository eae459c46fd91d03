"""The serving engine: one SAM with its LoRA adapters, an embedding cache, and hot swaps.

Threading model
    - One PEFT-wrapped SAM holds every adapter (checked and loaded by :mod:`service.slots`);
      the image encoder that runs is a :class:`~regcl.models.serving.ServingEncoder`, a plain
      copy of the base encoder into whose weights the adapter of the batch is folded (a copy
      in place: zero LoRA overhead, and a compiled encoder survives swaps). Which adapter is
      folded is model-global state, so running the encoder and every change to the adapters
      (add, activate, swap, delete) happen under one lock, ``_model_lock``.
    - Encodes are batched dynamically (:mod:`service.batching`): a request that misses the
      cache resizes and normalises its image on its own thread, then waits for the batcher
      thread, which collects up to ``max_batch`` images (or ``max_wait_ms``) and runs one
      encoder forward per adapter among them.
    - LoRA sits only in the image encoder (:func:`service.slots.check_adapter_files` refuses
      anything else before the model is touched), so the prompt encoder and mask decoder are
      the same for every adapter: decoding runs without the lock, on a second batcher thread
      (``regcl-decoder``): the prompts queued meanwhile that share a form decode in one
      mask-decoder call, each row with its own cached :class:`~service.cache.EncodedImage`
      (:func:`regcl.models.predict_masks_batched`); a prompt alone decodes through a fresh
      ``SamPredictor``, exactly as segment-anything does.
    - Adapter changes take the model lock before the encoder's next batch
      (:class:`~service.batching.WriterFirstLock`), so a swap waits one batch at most.
    - ``_registry_lock`` guards the live pointer and the domain table for a moment at a time;
      when both are taken the model lock comes first.
    - The caches lock themselves.

Hot swap: :meth:`SegmentationEngine.load_live` checks the new adapter, loads it into a new
slot and moves the live pointer under the model lock, then deletes the old slot. Embeddings
are cached under the slot's unique key, so a request that already encoded keeps its embedding
and reports the version it used; the next encode of ``live`` uses the new one; none fails.

Images: :meth:`~SegmentationEngine.register_image` keeps the original image in a byte-bounded
LRU store (the embedding is computed lazily, per adapter). An image evicted from the store can
still be segmented with adapters whose embedding is cached; otherwise
:class:`~service.errors.ImageNotFoundError` asks the client to upload it again.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from regcl.adapters import AdapterConfig, AdapterFiles, attach_lora, unwrap
from regcl.data.images import DEFAULT_MAX_PIXELS, decode_image_bytes
from regcl.errors import ConfigError
from regcl.models import model_fingerprint, predict_masks_batched
from regcl.models.serving import ServingEncoder, lora_deltas
from service.batching import Batcher, BatchStats, Pending, WriterFirstLock
from service.cache import ByteLRU, CacheStats, EmbeddingCache, EncodedImage
from service.errors import (
    AdapterRejectedError,
    ImageNotFoundError,
    InvalidAdapterNameError,
    InvalidImageError,
    UnknownAdapterError,
)
from service.prompts import DEFAULT_MAX_POINTS, Prompt, check_bounds, check_prompt
from service.slots import AdapterSlot, add_slot, check_adapter_files, remove_slot

logger = logging.getLogger(__name__)

BASE = "base"
"""Adapter name (and version label) of the model without any adapter."""
LIVE = "live"
"""Adapter name of the current merged adapter; its label is ``live:<version>``."""
DEFAULT_IMAGE_STORE_BYTES = 512 * 2**20
DEFAULT_MAX_DOMAINS = 8
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_UNKNOWN = object()  # the model's adapter state after a change: set it again before encoding


@dataclass(frozen=True)
class SegmentResult:
    """Masks for one prompt on one image.

    masks: N x H x W bool at the image's size (N = 3 with multimask, else 1). scores: N float32
    predicted IoU. low_res_logits: N x h x w float32 (h = w = 4 x the embedding size; 256 for
    SAM), to pass back as ``mask_input``. adapter_version: the label of the adapter whose
    embedding was used (``base``, ``live:3``, ``domain:polyp``).
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray
    adapter_version: str
    image_id: str
    cache_hit: bool


@dataclass(frozen=True)
class SwapResult:
    """One :meth:`SegmentationEngine.load_live` call. seconds: the whole call (checks, waiting
    for the lock, swap); locked_seconds: how long encoding was paused. swapped is False when
    the version was live already (nothing changed)."""

    version: int
    previous_version: int | None
    seconds: float
    locked_seconds: float
    dropped_embeddings: int
    swapped: bool = True


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics."""

    embeddings: CacheStats
    images: CacheStats
    live_version: int | None
    domains: tuple[str, ...]
    encodes: int
    swaps: int
    last_swap: SwapResult | None


@dataclass(frozen=True)
class _Prepared:
    pixels: torch.Tensor  # 1 x 3 x S x S, normalised and padded (Sam.preprocess)
    original_size: tuple[int, int]
    input_size: tuple[int, int]


@dataclass(frozen=True)
class _EncodeJob:
    image_id: str
    adapter: str  # as requested (``live`` is resolved when the batch runs)
    prepared: _Prepared


@dataclass(frozen=True)
class _DecodeJob:
    encoded: EncodedImage
    prompt: Prompt
    multimask: bool
    cache_hit: bool


@dataclass(frozen=True)
class ServingOptions:
    """How the engine runs its encoder (see :class:`~regcl.models.serving.ServingEncoder`).

    device: ``cpu``, ``cuda``, ``cuda:1``... dtype: None picks bfloat16 on CUDA, float32 on
    the CPU. sdpa: None picks SDPA attention on CUDA and segment-anything's own on the CPU
    (with float32: bit-exact SamPredictor parity, which the API tests hold the service to).
    On the CPU ``sdpa=True`` (``REGCL_SERVE_ATTENTION=sdpa``) was as fast or faster for the
    tiny encoder in our runs, with masks within 1e-4 of SamPredictor's.
    max_decode_batch: most prompts in one mask-decoder call.
    compile: ``torch.compile`` the encoder. max_batch / max_wait_ms: dynamic batching of
    encodes; max_wait_ms None picks 0 on the CPU (the encoder is the bottleneck: requests
    queue up while a batch runs, so batches form without waiting) and 2 ms on CUDA. threads:
    torch intra-op threads (0: leave torch's default; 1 suits a small CPU, where the batcher
    thread and the request threads already run in parallel).
    """

    device: str = "cpu"
    dtype: torch.dtype | None = None
    sdpa: bool | None = None
    compile: bool = False
    max_batch: int = 8
    max_wait_ms: float | None = None
    threads: int = 0
    max_decode_batch: int = 32

    def resolved(self) -> ServingOptions:
        """Options with the automatic choices made (a device that exists is required)."""
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"invalid device {self.device!r}: {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")
        gpu = device.type == "cuda"
        wait = (2.0 if gpu else 0.0) if self.max_wait_ms is None else self.max_wait_ms
        if self.max_batch < 1 or wait < 0 or self.threads < 0 or self.max_decode_batch < 1:
            raise ConfigError("need max_batch >= 1, max_wait_ms >= 0, threads >= 0 and "
                              "max_decode_batch >= 1")
        dtype = self.dtype or (torch.bfloat16 if gpu else torch.float32)
        sdpa = gpu if self.sdpa is None else self.sdpa
        return ServingOptions(str(device), dtype, sdpa, self.compile, self.max_batch, wait,
                              self.threads, self.max_decode_batch)


def image_id_of(image: np.ndarray) -> str:
    """Content hash of an H x W x 3 uint8 image: sha256 of its shape and pixels (hex)."""
    digest = hashlib.sha256(f"{image.shape[0]}x{image.shape[1]}x3:uint8:".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


class SegmentationEngine:
    """Segments images with a SAM and its LoRA adapters; see the module docstring.

    Args:
        sam: the base model. It is wrapped **in place** by PEFT (its image-encoder linears
            become LoRA layers), so do not use it elsewhere afterwards; move it to its device
            and put it in eval mode before.
        cache_bytes: budget of the embedding cache (sum of embedding tensor bytes).
        image_store_bytes: budget of the uploaded-image store (sum of array bytes).
        max_domains: domain adapters kept loaded; loading one more unloads the least
            recently used.
        max_points: most point prompts per request.
        options: device, precision, attention, compile and batching
            (:class:`ServingOptions`; default: CPU, float32, no compile, batches of 8).
    """

    def __init__(self, sam: Sam, cache_bytes: int, *,
                 image_store_bytes: int = DEFAULT_IMAGE_STORE_BYTES,
                 max_domains: int = DEFAULT_MAX_DOMAINS,
                 max_points: int = DEFAULT_MAX_POINTS,
                 options: ServingOptions | None = None) -> None:
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
        # A plain copy made before PEFT wraps the model: what actually encodes (see above).
        self._encoder = ServingEncoder(sam.image_encoder, device=self.options.device,
                                       dtype=self.options.dtype, sdpa=bool(self.options.sdpa),
                                       compile=self.options.compile,
                                       buckets=_buckets(self.options.max_batch))
        self._model = attach_lora(sam, AdapterConfig(rank=1))  # placeholder, never active
        self._model.eval()
        self._sam: Sam = unwrap(self._model)
        self._transform = ResizeLongestSide(self._sam.image_encoder.img_size)
        self._mask_input_size = tuple(self._sam.prompt_encoder.mask_input_size)
        self.max_domains = max_domains
        self.max_points = max_points
        self._cache = EmbeddingCache(cache_bytes)
        self._images: ByteLRU[str, np.ndarray] = ByteLRU(image_store_bytes)
        self._model_lock = WriterFirstLock()  # adapter changes before the next batch
        self._registry_lock = threading.Lock()
        self._live: AdapterSlot | None = None
        self._domains: OrderedDict[str, AdapterSlot] = OrderedDict()
        self._active: object = _UNKNOWN
        self._slot_ids = itertools.count(1)
        self._encodes = 0
        self._swaps: deque[SwapResult] = deque(maxlen=64)
        self._swap_count = 0
        self._fingerprint: str | None = None
        self._batcher: Batcher[_EncodeJob] = Batcher(
            self._run_encode_batch, max_batch=self.options.max_batch,
            max_wait_s=(self.options.max_wait_ms or 0.0) / 1000, name="regcl-encoder")
        # Decodes never wait for company: whatever queued while one batch ran is the next.
        self._decoder: Batcher[_DecodeJob] = Batcher(
            self._run_decode_batch, max_batch=self.options.max_decode_batch, max_wait_s=0.0,
            name="regcl-decoder")

    def close(self) -> None:
        """Stop the batching threads (after the work already queued)."""
        self._batcher.close()
        self._decoder.close()

    # ----------------------------------------------------------------------------- images
    def register_image(self, image: np.ndarray) -> str:
        """Store an H x W x 3 uint8 RGB image (a private read-only copy); returns its id.

        The id is a content hash, so registering the same pixels twice gives the same id and
        reuses cached embeddings. Raises InvalidImageError for other arrays, or an image
        larger than the whole store.
        """
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
                or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            shape = getattr(image, "shape", None)
            dtype = getattr(image, "dtype", type(image).__name__)
            raise InvalidImageError(f"expected an H x W x 3 uint8 image, got {dtype} {shape}")
        image_id = image_id_of(image)
        if self._images.get(image_id) is None:
            stored = np.array(image, dtype=np.uint8, order="C", copy=True)
            stored.setflags(write=False)
            if not self._images.put(image_id, stored):
                raise InvalidImageError(f"image of {stored.nbytes} bytes exceeds the image "
                                        f"store ({self._images.max_bytes} bytes)")
        return image_id

    def register_image_bytes(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
        """Decode an uploaded PNG/JPEG/... (``regcl.data.images.decode_image_bytes``, which
        raises DataError) and register it."""
        return self.register_image(decode_image_bytes(data, max_pixels))

    def has_image(self, image_id: str) -> bool:
        return image_id in self._images

    def image(self, image_id: str) -> np.ndarray | None:
        """The stored H x W x 3 uint8 image (read-only), or None if it is not (any more)."""
        return self._images.peek(image_id) if isinstance(image_id, str) else None

    def forget_image(self, image_id: str) -> bool:
        """Drop an image and all its embeddings; returns whether anything was stored."""
        dropped = self._cache.drop_where(lambda key: key[0] == image_id)
        return self._images.pop(image_id) is not None or dropped > 0

    # ----------------------------------------------------------------------------- inference
    def encode(self, image_id: str, adapter: str = LIVE) -> tuple[EncodedImage, str]:
        """The image's embedding under ``adapter`` (``base``, ``live`` or a loaded domain),
        from the cache or computed as ``SamPredictor.set_image`` does. Returns it and the
        adapter version label that made it."""
        encoded, _ = self._encode(image_id, adapter)
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
                ``adapter_version`` then says ``base``) or a loaded domain adapter's name.
        Raises:
            UnknownAdapterError, ImageNotFoundError, or a PromptError subclass.
        """
        self._resolve(adapter)  # unknown adapter: fail before any work
        prompt = self._check_prompt(point_coords, point_labels, box, mask_input)
        stored = self._images.peek(image_id) if isinstance(image_id, str) else None
        if stored is not None:
            check_bounds(prompt, stored.shape[:2])  # before paying for an encode
        encoded, hit = self._encode(image_id, adapter)
        return self._decode(encoded, prompt, multimask, hit)

    def decode(self, encoded: EncodedImage, point_coords: object = None,
               point_labels: object = None, box: object = None, mask_input: object = None,
               multimask: bool = True) -> SegmentResult:
        """Segment with an embedding from :meth:`encode` (still valid after a swap; the result
        reports the version that made it). Arguments as in :meth:`segment`."""
        prompt = self._check_prompt(point_coords, point_labels, box, mask_input)
        return self._decode(encoded, prompt, multimask, True)

    def segment_many(self, image_id: str, prompts: Sequence[Mapping[str, object]],
                     multimask: bool = True, adapter: str = LIVE) -> list[SegmentResult]:
        """Several prompts on one image: one encode (or cache hit) and one mask-decoder call
        per group of prompts of the same form (same number of points, box or not,
        mask_input or not), as ``SamPredictor.predict_torch`` decodes a batch of prompts.

        Each prompt is a mapping with the keywords of :meth:`segment` (``point_coords``,
        ``point_labels``, ``box``, ``mask_input``). Results come back in the prompts' order.
        """
        self._resolve(adapter)
        checked = [self._check_prompt(p.get("point_coords"), p.get("point_labels"),
                                      p.get("box"), p.get("mask_input")) for p in prompts]
        if not checked:
            return []
        stored = self._images.peek(image_id) if isinstance(image_id, str) else None
        for prompt in checked:
            if stored is not None:
                check_bounds(prompt, stored.shape[:2])
        encoded, hit = self._encode(image_id, adapter)
        for prompt in checked:
            check_bounds(prompt, encoded.original_size)
        groups: dict[tuple, list[int]] = {}
        for index, prompt in enumerate(checked):
            form = (None if prompt.point_coords is None else len(prompt.point_coords),
                    prompt.box is not None, prompt.mask_input is not None)
            groups.setdefault(form, []).append(index)
        predictor = self._predictor(encoded)
        results: list[SegmentResult | None] = [None] * len(checked)
        device = self._sam.device
        for indices in groups.values():
            group = [checked[i] for i in indices]
            coords = labels = boxes = masks_in = None
            if group[0].point_coords is not None:
                coords = torch.as_tensor(np.stack([predictor.transform.apply_coords(
                    p.point_coords, encoded.original_size) for p in group]),
                    dtype=torch.float, device=device)
                labels = torch.as_tensor(np.stack([p.point_labels for p in group]),
                                         dtype=torch.int, device=device)
            if group[0].box is not None:
                boxes = torch.as_tensor(np.stack([predictor.transform.apply_boxes(
                    p.box, encoded.original_size)[0] for p in group]),
                    dtype=torch.float, device=device)
            if group[0].mask_input is not None:
                masks_in = torch.as_tensor(np.stack([p.mask_input for p in group]),
                                           dtype=torch.float, device=device)
            masks, scores, low_res = predictor.predict_torch(
                coords, labels, boxes, masks_in, multimask_output=bool(multimask))
            masks_np = masks.detach().cpu().numpy()
            scores_np = scores.float().detach().cpu().numpy()
            low_np = low_res.float().detach().cpu().numpy()
            for row, index in enumerate(indices):
                results[index] = SegmentResult(masks_np[row], scores_np[row], low_np[row],
                                               encoded.adapter_version, encoded.image_id, hit)
        return [r for r in results if r is not None]

    def _check_prompt(self, point_coords: object, point_labels: object, box: object,
                      mask_input: object) -> Prompt:
        return check_prompt(point_coords, point_labels, box, mask_input,
                            mask_input_size=self._mask_input_size, max_points=self.max_points)

    def _encode(self, image_id: str, adapter: str) -> tuple[EncodedImage, bool]:
        slot = self._resolve(adapter)
        if not isinstance(image_id, str):
            raise ImageNotFoundError(f"image ids are strings, got {type(image_id).__name__}")
        cached = self._cache.get((image_id, _key(slot)))
        if cached is not None:
            return cached, True
        image = self._images.get(image_id)
        if image is None:
            raise ImageNotFoundError(f"unknown image id {image_id!r} (never uploaded, or "
                                     "evicted: upload it again)")
        prepared = self._prepare(image)  # resizing and normalising need no lock
        return self._batcher.run(_EncodeJob(image_id, adapter, prepared))

    def _run_encode_batch(self, batch: list[Pending[_EncodeJob]]) -> None:
        """The batcher thread: one encoder forward per adapter among ``batch`` (each image
        once), under the model lock; settles every future with (embedding, cache_hit)."""
        with self._model_lock.after_writers():
            groups: dict[str, tuple[AdapterSlot | None, dict[str, list[Pending]]]] = {}
            for pending in batch:
                job = pending.item
                try:  # resolved now: a swap or unload may have happened since the request
                    slot = self._resolve(job.adapter)
                except Exception as exc:
                    pending.future.set_exception(exc)
                    continue
                key = _key(slot)
                cached = self._cache.peek((job.image_id, key))
                if cached is not None:
                    pending.future.set_result((cached, True))
                    continue
                group = groups.setdefault(key, (slot, {}))[1]
                group.setdefault(job.image_id, []).append(pending)
            for key, (slot, by_image) in groups.items():
                try:
                    self._activate(slot)
                    pixels = torch.cat([waiting[0].item.prepared.pixels
                                        for waiting in by_image.values()])
                    features = self._encoder(pixels)
                except Exception as exc:
                    for waiting in by_image.values():
                        for pending in waiting:
                            pending.future.set_exception(exc)
                    continue
                for index, (image_id, waiting) in enumerate(by_image.items()):
                    prepared = waiting[0].item.prepared
                    encoded = EncodedImage(image_id, features[index : index + 1].clone(),
                                           prepared.original_size, prepared.input_size,
                                           _label(slot), key)
                    # Stored under the lock: once a swap has dropped a version, nothing
                    # re-adds it.
                    self._cache.put((image_id, key), encoded)
                    self._encodes += 1
                    for position, pending in enumerate(waiting):
                        pending.future.set_result((encoded, position > 0))

    def _prepare(self, image: np.ndarray) -> _Prepared:
        """SamPredictor.set_image up to the encoder: resize the long side, normalise, pad."""
        if self._sam.image_format != "RGB":
            image = image[..., ::-1]
        resized = self._transform.apply_image(image)
        tensor = torch.as_tensor(resized, device=self._sam.device)
        tensor = tensor.permute(2, 0, 1).contiguous()[None, :, :, :]
        with torch.no_grad():
            pixels = self._sam.preprocess(tensor)
        return _Prepared(pixels, (int(image.shape[0]), int(image.shape[1])),
                         (int(tensor.shape[-2]), int(tensor.shape[-1])))

    def _activate(self, slot: AdapterSlot | None) -> None:
        """Fold ``slot``'s adapter (None: none) into the serving encoder's weights. Caller
        holds the model lock."""
        want = _key(slot)
        if self._active == want:
            return
        self._active = _UNKNOWN  # a fold that fails half-way leaves unknown weights
        deltas = None if slot is None else lora_deltas(self._sam.image_encoder, slot.key)
        self._encoder.fold(deltas)
        self._active = want

    @property
    def serving_encoder(self) -> ServingEncoder:
        """The encoder that runs (its ``compiles`` counter, device, dtype)."""
        return self._encoder

    @property
    def batch_stats(self) -> BatchStats:
        """Encoder batches so far (count, images, largest): :class:`service.batching.BatchStats`."""
        return self._batcher.stats

    def _decode(self, encoded: EncodedImage, prompt: Prompt, multimask: bool,
                cache_hit: bool) -> SegmentResult:
        check_bounds(prompt, encoded.original_size)
        return self._decoder.run(_DecodeJob(encoded, prompt, bool(multimask), cache_hit))

    def _run_decode_batch(self, batch: list[Pending[_DecodeJob]]) -> None:
        """The decoder thread: prompts of the same form (point count, box, mask input,
        multimask) from concurrent requests decode together in one mask-decoder call, each
        row with its own image embedding; a prompt alone decodes as SamPredictor does."""
        groups: dict[tuple, list[Pending[_DecodeJob]]] = {}
        for pending in batch:
            prompt, job = pending.item.prompt, pending.item
            form = (None if prompt.point_coords is None else len(prompt.point_coords),
                    prompt.box is not None, prompt.mask_input is not None, job.multimask)
            groups.setdefault(form, []).append(pending)
        for pendings in groups.values():
            try:
                if len(pendings) == 1:
                    job = pendings[0].item
                    results = [self._decode_one(job.encoded, job.prompt, job.multimask,
                                                job.cache_hit)]
                else:
                    results = self._decode_rows([p.item for p in pendings])
            except Exception as exc:
                for pending in pendings:
                    pending.future.set_exception(exc)
                continue
            for pending, result in zip(pendings, results, strict=True):
                pending.future.set_result(result)

    @torch.no_grad()
    def _decode_rows(self, jobs: list[_DecodeJob]) -> list[SegmentResult]:
        """Prompts of one form on (possibly) different images: one decoder call
        (:func:`regcl.models.predict_masks_batched`), then each mask back to its image's
        size as ``SamPredictor.predict`` does."""
        sam, device = self._sam, self._sam.device
        first = jobs[0].prompt
        coords = labels = boxes = masks_in = None
        if first.point_coords is not None:
            coords = torch.as_tensor(np.stack([self._transform.apply_coords(
                j.prompt.point_coords, j.encoded.original_size) for j in jobs]),
                dtype=torch.float, device=device)
            labels = torch.as_tensor(np.stack([j.prompt.point_labels for j in jobs]),
                                     dtype=torch.int, device=device)
        if first.box is not None:
            boxes = torch.as_tensor(np.stack([self._transform.apply_boxes(
                j.prompt.box, j.encoded.original_size)[0] for j in jobs]),
                dtype=torch.float, device=device)
        if first.mask_input is not None:
            masks_in = torch.as_tensor(np.stack([j.prompt.mask_input for j in jobs]),
                                       dtype=torch.float, device=device)
        features = torch.cat([j.encoded.features for j in jobs])
        low_res, iou = predict_masks_batched(sam, features, coords, labels, boxes, masks_in,
                                             multimask_output=jobs[0].multimask)
        results = []
        for row, job in enumerate(jobs):
            masks = sam.postprocess_masks(low_res[row : row + 1], job.encoded.input_size,
                                          job.encoded.original_size) > sam.mask_threshold
            results.append(SegmentResult(
                masks[0].cpu().numpy(), iou[row].float().cpu().numpy(),
                low_res[row].float().cpu().numpy(), job.encoded.adapter_version,
                job.encoded.image_id, job.cache_hit))
        return results

    def _decode_one(self, encoded: EncodedImage, prompt: Prompt, multimask: bool,
                    cache_hit: bool) -> SegmentResult:
        predictor = self._predictor(encoded)
        masks, scores, low_res = predictor.predict(
            point_coords=prompt.point_coords, point_labels=prompt.point_labels, box=prompt.box,
            mask_input=prompt.mask_input, multimask_output=bool(multimask))
        return SegmentResult(masks, scores, low_res, encoded.adapter_version, encoded.image_id,
                             cache_hit)

    def _predictor(self, encoded: EncodedImage) -> SamPredictor:
        predictor = SamPredictor(self._sam)  # per request: its image state is per request
        predictor.features = encoded.features
        predictor.original_size = encoded.original_size
        predictor.input_size = encoded.input_size
        predictor.is_image_set = True
        return predictor

    # ----------------------------------------------------------------------------- adapters
    def _resolve(self, adapter: str) -> AdapterSlot | None:
        if adapter == BASE:
            return None
        with self._registry_lock:
            if adapter == LIVE:
                return self._live
            slot = self._domains.get(adapter) if isinstance(adapter, str) else None
            if slot is None:
                known = [BASE, LIVE, *self._domains]
                raise UnknownAdapterError(f"unknown adapter {adapter!r}; loaded: {known}")
            self._domains.move_to_end(adapter)
            return slot

    def _new_slot(self, kind: str, name: str, version: int | None, files: AdapterFiles
                  ) -> AdapterSlot:
        label = f"live:{version}" if kind == LIVE else f"domain:{name}"
        return AdapterSlot(f"slot{next(self._slot_ids)}", label, kind, name, version,
                           str(files.path), time.time())

    def _add_slot(self, slot: AdapterSlot, config, files: AdapterFiles, source: str) -> None:
        """add_slot, then prove the adapter folds into plain weights (not DoRA, only linear
        layers); else remove it again. Caller holds the model lock."""
        add_slot(self._model, slot.key, config, files, source)
        try:
            lora_deltas(self._sam.image_encoder, slot.key)
        except ConfigError as exc:
            remove_slot(self._model, slot.key)
            raise AdapterRejectedError(f"{source}: {exc}") from exc

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
        config = check_adapter_files(self._sam, files, source)
        with self._model_lock:
            locked = time.perf_counter()
            previous = self._live
            if previous is not None and previous.version == version and not force:
                return SwapResult(version, version, time.perf_counter() - start, 0.0, 0,
                                  swapped=False)
            slot = self._new_slot(LIVE, LIVE, version, files)
            try:
                self._add_slot(slot, config, files, source)
            finally:
                self._active = _UNKNOWN
            with self._registry_lock:
                self._live = slot
            if previous is not None:
                remove_slot(self._model, previous.key)
            locked_seconds = time.perf_counter() - locked
        dropped = self._cache.drop_adapter(previous.key) if previous is not None else 0
        result = SwapResult(version, previous.version if previous else None,
                            time.perf_counter() - start, locked_seconds, dropped)
        with self._registry_lock:
            self._swaps.append(result)
            self._swap_count += 1
        logger.info("live adapter v%s -> v%s in %.3f s (encoding paused %.3f s, %d embeddings "
                    "dropped)", result.previous_version, version, result.seconds,
                    locked_seconds, dropped)
        return result

    def clear_live(self) -> int | None:
        """Stop serving a live adapter (``live`` becomes base); returns the version removed."""
        with self._model_lock:
            with self._registry_lock:
                previous, self._live = self._live, None
            if previous is not None:
                remove_slot(self._model, previous.key)
                self._active = _UNKNOWN
        if previous is None:
            return None
        self._cache.drop_adapter(previous.key)
        return previous.version

    def load_domain(self, name: str, files: AdapterFiles) -> AdapterSlot:
        """Serve ``files`` as domain adapter ``name`` (replacing a loaded one of that name).
        Unloads the least recently used domains beyond ``max_domains``."""
        if not isinstance(name, str) or name in (BASE, LIVE) or not _DOMAIN_NAME.fullmatch(name):
            raise InvalidAdapterNameError(f"invalid domain adapter name {name!r}")
        if self.max_domains == 0:
            raise ConfigError("this engine serves no domain adapters (max_domains=0)")
        source = f"domain adapter {name!r} ({files.path})"
        config = check_adapter_files(self._sam, files, source)
        with self._model_lock:
            slot = self._new_slot("domain", name, None, files)
            try:
                self._add_slot(slot, config, files, source)
            finally:
                self._active = _UNKNOWN
            with self._registry_lock:
                gone = [self._domains.pop(name, None)]
                self._domains[name] = slot
                while len(self._domains) > self.max_domains:
                    gone.append(self._domains.popitem(last=False)[1])
            gone = [old for old in gone if old is not None]
            for old in gone:
                remove_slot(self._model, old.key)
        for old in gone:
            self._cache.drop_adapter(old.key)
            if old.name != name:
                logger.info("unloaded domain adapter %r (least recently used)", old.name)
        return slot

    def unload_domain(self, name: str) -> None:
        """Stop serving domain adapter ``name``; raises UnknownAdapterError if not loaded."""
        with self._model_lock:
            with self._registry_lock:
                slot = self._domains.pop(name, None) if isinstance(name, str) else None
            if slot is None:
                raise UnknownAdapterError(f"domain adapter {name!r} is not loaded")
            remove_slot(self._model, slot.key)
            self._active = _UNKNOWN
        self._cache.drop_adapter(slot.key)

    def domains(self) -> list[str]:
        """Loaded domain adapters, least recently used first."""
        with self._registry_lock:
            return list(self._domains)

    def adapters(self) -> list[AdapterSlot]:
        """Every adapter being served: the live one (if any), then the domains."""
        with self._registry_lock:
            return ([self._live] if self._live else []) + list(self._domains.values())

    @property
    def live_version(self) -> int | None:
        """The live adapter's version; None when ``live`` means the base model."""
        live = self._live
        return None if live is None else live.version

    @property
    def live_label(self) -> str:
        """What a ``live`` request reports now: ``live:<version>`` or ``base``."""
        return _label(self._live)

    @property
    def base_fingerprint(self) -> str:
        """``regcl.models.model_fingerprint`` of the base weights (computed once), to compare
        with the base model an adapter was trained on before loading it."""
        if self._fingerprint is None:
            with self._model_lock:
                self._fingerprint = model_fingerprint(self._model)
        return self._fingerprint

    # ----------------------------------------------------------------------------- metrics
    @property
    def cache(self) -> EmbeddingCache:
        return self._cache

    def swap_history(self) -> list[SwapResult]:
        """The most recent swaps (up to 64), oldest first."""
        with self._registry_lock:
            return list(self._swaps)

    def stats(self) -> EngineStats:
        with self._registry_lock:
            last = self._swaps[-1] if self._swaps else None
            domains = tuple(self._domains)
            swaps = self._swap_count
        return EngineStats(self._cache.stats(), self._images.stats(), self.live_version,
                           domains, self._encodes, swaps, last)


def _buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes a compiled encoder is called with: powers of two up to ``max_batch``, and
    ``max_batch`` itself."""
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def _key(slot: AdapterSlot | None) -> str:
    return BASE if slot is None else slot.key


def _label(slot: AdapterSlot | None) -> str:
    return BASE if slot is None else slot.label
