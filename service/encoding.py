"""Image embeddings: the embedding cache first, else one batched encoder forward per adapter.

The image encoder that runs is a :class:`~regcl.models.serving.ServingEncoder`, a plain copy
of the base encoder into whose weights the adapter of a batch is folded (an in-place copy:
zero LoRA overhead, and a compiled encoder survives swaps). Which adapter is folded is
model-global state, so encoding runs under the adapter table's model lock.

Encodes are batched dynamically (:mod:`service.batching`): a request that misses the cache
resizes and normalises its image on its own thread (as ``SamPredictor.set_image`` does up to
the encoder), then waits for the batcher thread, which collects up to ``max_batch`` images
(or ``max_wait_ms``) and runs one encoder forward per adapter among them. Embeddings are
cached under the adapter slot's unique key, so a hot swap makes the old version's
embeddings unreachable by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from regcl.models.serving import ServingEncoder
from service.adapter_table import AdapterTable, Target, slot_key, slot_label
from service.batching import Batcher, BatchStats, Pending
from service.cache import EmbeddingCache, EncodedImage
from service.errors import ImageNotFoundError
from service.image_store import ImageStore
from service.options import ServingOptions
from service.slots import AdapterSlot

__all__ = ["ImageEncoding"]


@dataclass(frozen=True)
class _Prepared:
    pixels: torch.Tensor  # 1 x 3 x S x S, normalised and padded (Sam.preprocess)
    original_size: tuple[int, int]
    input_size: tuple[int, int]


@dataclass(frozen=True)
class _EncodeJob:
    image_id: str
    target: Target  # LIVE is resolved when the batch runs
    prepared: _Prepared


class ImageEncoding:
    """Embeddings of stored images under the table's adapters (see the module docstring)."""

    def __init__(self, encoder: ServingEncoder, table: AdapterTable, cache: EmbeddingCache,
                 images: ImageStore, options: ServingOptions) -> None:
        self.encoder = encoder
        self.encodes = 0
        self._table = table
        self._sam = table.sam
        self._cache = cache
        self._images = images
        self._transform = ResizeLongestSide(self._sam.image_encoder.img_size)
        self._active: str | None = None  # slot key folded into the encoder; None: unknown
        self._batcher: Batcher[_EncodeJob] = Batcher(
            self._run_batch, max_batch=options.max_batch,
            max_wait_s=(options.max_wait_ms or 0.0) / 1000, name="regcl-encoder")

    def close(self) -> None:
        self._batcher.close()

    @property
    def batch_stats(self) -> BatchStats:
        """Encoder batches so far (count, images, largest)."""
        return self._batcher.stats

    def _slot(self, target: Target) -> AdapterSlot | None:
        return self._table.resolve(target) if isinstance(target, str) else target

    def encode(self, image_id: str, target: Target) -> tuple[EncodedImage, bool]:
        """Image ``image_id``'s embedding under ``target`` and whether it was cached (or made
        by another request of the same batch). Raises ImageNotFoundError."""
        if not isinstance(image_id, str):
            raise ImageNotFoundError(f"image ids are strings, got {type(image_id).__name__}")
        cached = self._cache.get((image_id, slot_key(self._slot(target))))
        if cached is not None:
            return cached, True
        prepared = self._prepare(self._images.get(image_id))  # no lock needed for this
        return self._batcher.run(_EncodeJob(image_id, target, prepared))

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

    def _run_batch(self, batch: list[Pending[_EncodeJob]]) -> None:
        """The batcher thread: one encoder forward per adapter among ``batch`` (each image
        once), under the model lock; settles every future with (embedding, cache_hit)."""
        with self._table.lock.after_writers():
            groups: dict[str, tuple[AdapterSlot | None, dict[str, list[Pending]]]] = {}
            for pending in batch:
                job = pending.item
                try:  # live is resolved now: a swap may have happened since the request
                    slot = self._slot(job.target)
                except Exception as exc:
                    pending.future.set_exception(exc)
                    continue
                key = slot_key(slot)
                cached = self._cache.peek((job.image_id, key))
                if cached is not None:
                    pending.future.set_result((cached, True))
                    continue
                group = groups.setdefault(key, (slot, {}))[1]
                group.setdefault(job.image_id, []).append(pending)
            for key, (slot, by_image) in groups.items():
                try:
                    self._fold(slot)
                    pixels = torch.cat([waiting[0].item.prepared.pixels
                                        for waiting in by_image.values()])
                    features = self.encoder(pixels)
                except Exception as exc:
                    for waiting in by_image.values():
                        for pending in waiting:
                            pending.future.set_exception(exc)
                    continue
                for index, (image_id, waiting) in enumerate(by_image.items()):
                    prepared = waiting[0].item.prepared
                    encoded = EncodedImage(image_id, features[index : index + 1].clone(),
                                           prepared.original_size, prepared.input_size,
                                           slot_label(slot), key)
                    # Stored under the lock: once a swap has dropped a version, nothing
                    # re-adds it.
                    self._cache.put((image_id, key), encoded)
                    self.encodes += 1
                    for position, pending in enumerate(waiting):
                        pending.future.set_result((encoded, position > 0))

    def _fold(self, slot: AdapterSlot | None) -> None:
        """Fold ``slot``'s adapter (None: none) into the encoder's weights. Slot keys are
        unique per load, so an unchanged key means unchanged weights. Caller holds the model
        lock."""
        want = slot_key(slot)
        if self._active == want:
            return
        self._active = None  # a fold that fails half-way leaves unknown weights
        self.encoder.fold(self._table.deltas(slot))
        self._active = want
