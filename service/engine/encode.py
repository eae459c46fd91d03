"""Image embeddings: the embedding cache first, then the embedding store (persisted by a
pre-encode, :mod:`service.engine.embedding_store`; read on the request's thread and cached),
else one batched encoder forward.

The image encoder that runs is a :class:`~regcl.models.serving.ServingEncoder`, a plain copy
of the base encoder. Uncompiled, it runs a batch's images in **one** forward whatever their
adapters: base weights once for the batch, then each image's own LoRA update from the
encoder's bank (:mod:`regcl.models.lora_bank`); ``base``, ``live``, named domains and
``auto`` share the forward. Compiled, it folds one adapter at a time into its weights (an
in-place copy: zero LoRA overhead, no recompile on swaps) and runs one forward per adapter
in the batch. The bank and the folded weights change only under the adapter table's model
lock, which the batcher holds while it encodes.

Encodes are batched dynamically (:mod:`service.engine.batching`): a request that misses the cache
resizes and normalises its image on its own thread (as ``SamPredictor.set_image`` does up to
the encoder), then waits for the batcher thread, which collects up to ``max_batch`` images
(or ``max_wait_ms``) and encodes them together. Embeddings are
cached under the adapter slot's unique key, so a hot swap makes the old version's
embeddings unreachable by construction.

For ``adapter: "auto"`` (:mod:`service.engine.auto_routing`) the encode is split: :meth:`prefix`
runs the blocks before the first adapted one (no adapter there), the router reads those
tokens, and the request's encode job then carries them, so its batch finishes the encoder from
them with the chosen adapter instead of starting again from the pixels (the batch's other
images run their prefix up to that block first, then one suffix serves them all). That embedding is
cached under the chosen slot's key like any other (one entry per image and adapter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from regcl.models.serving import ServingEncoder
from service.engine.adapter_table import AdapterTable, Target, slot_key, slot_label
from service.engine.batching import Batcher, BatchStats, Pending
from service.engine.caches import EmbeddingCache, EncodedImage
from service.engine.embedding_store import EmbeddingStore
from service.engine.errors import ImageNotFoundError
from service.engine.image_store import ImageStore
from service.engine.options import ServingOptions
from service.engine.slots import AdapterSlot

__all__ = ["ImageEncoding", "RouterPrefix"]


@dataclass(frozen=True)
class _Prepared:
    pixels: torch.Tensor  # 1 x 3 x S x S, normalised and padded (Sam.preprocess)
    original_size: tuple[int, int]
    input_size: tuple[int, int]


@dataclass(frozen=True)
class RouterPrefix:
    """An image's tokens entering encoder ``block`` (1 x h x w x C, from :meth:`ImageEncoding.
    prefix`) and its prepared pixels: what ``auto`` routes from and its encode finishes from
    (the pixels are not prepared a second time)."""

    tokens: torch.Tensor
    block: int
    prepared: _Prepared


@dataclass(frozen=True)
class _EncodeJob:
    image_id: str
    target: Target  # LIVE is resolved when the batch runs
    prepared: _Prepared
    tokens: torch.Tensor | None = None  # 1 x h x w x C entering block `block`, or None
    block: int = 0
    prefix_only: bool = False  # return the tokens entering `block`, not an embedding


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` (each 1 x ...) joined along dim 0 in the memory layout of the first.

    The encoder's tokens are a permuted view (B x h x w x C over B x C x h x w memory), and
    the blocks compute (bit for bit) differently on a contiguous copy; joined this way the
    tail sees the layout a whole forward would have given it.
    """
    first = parts[0]
    order = sorted(range(first.dim()), key=lambda d: (-first.stride(d), d))
    inverse = [order.index(d) for d in range(first.dim())]
    return torch.cat([p.permute(order) for p in parts], dim=order.index(0)).permute(inverse)


class ImageEncoding:
    """Embeddings of stored images under the table's adapters (see the module docstring)."""

    def __init__(self, encoder: ServingEncoder, table: AdapterTable, cache: EmbeddingCache,
                 images: ImageStore, options: ServingOptions) -> None:
        self.encoder = encoder
        self.store: EmbeddingStore | None = None  # persisted embeddings, read on a cache miss
        self.encodes = 0
        self.forwards = 0  # encoder forwards that made embeddings (prefixes not counted)
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

    def slot(self, target: Target) -> AdapterSlot | None:
        """The slot ``target`` names now (``live`` resolved)."""
        return self._table.resolve(target) if isinstance(target, str) else target

    def encode(self, image_id: str, target: Target, prefix: RouterPrefix | None = None
               ) -> tuple[EncodedImage, bool]:
        """Image ``image_id``'s embedding under ``target`` and whether it was cached (or made
        by another request of the same batch). ``prefix``: the image's tokens entering a
        block (:meth:`prefix`), to finish from when the adapter leaves the blocks before it
        alone. Raises ImageNotFoundError."""
        if not isinstance(image_id, str):
            raise ImageNotFoundError(f"image ids are strings, got {type(image_id).__name__}")
        slot = self.slot(target)
        cached = self._cache.get((image_id, slot_key(slot)))
        if cached is not None:
            return cached, True
        if prefix is not None:
            return self._batcher.run(_EncodeJob(image_id, target, prefix.prepared,
                                                prefix.tokens, prefix.block))
        if self.store is not None:
            stored = self._from_store(image_id, target, slot)
            if stored is not None:
                return stored, True
        prepared = self._prepare(self._images.get(image_id))  # no lock needed for this
        return self._batcher.run(_EncodeJob(image_id, target, prepared))

    @property
    def busy(self) -> bool:
        """Whether encodes are queued or running (what a background job waits out)."""
        return self._batcher.in_flight > 0

    def _from_store(self, image_id: str, target: Target, slot: AdapterSlot | None
                    ) -> EncodedImage | None:
        """The persisted embedding (:mod:`service.engine.embedding_store`), now also cached;
        None when there is none. Cached only while ``target`` still resolves to ``slot``: a
        swap that dropped the slot's entries meanwhile must not see them come back."""
        assert self.store is not None
        key = slot_key(slot)
        stored = self.store.get(image_id, slot, key, self._sam.device)
        if stored is None:
            return None
        self._cache.put((image_id, key), stored)
        if self.slot(target) is not slot:
            self._cache.pop((image_id, key))
        return stored

    def prefix(self, image_id: str, block: int) -> RouterPrefix:
        """The image's tokens entering encoder ``block`` (1 x h x w x C, the encoder's dtype),
        computed with no adapter folded into the blocks before it, with its prepared pixels.
        Raises ImageNotFoundError."""
        if not isinstance(image_id, str):
            raise ImageNotFoundError(f"image ids are strings, got {type(image_id).__name__}")
        prepared = self._prepare(self._images.get(image_id))
        tokens, _ = self._batcher.run(_EncodeJob(image_id, None, prepared, None, block,
                                                 prefix_only=True))
        return RouterPrefix(tokens, block, prepared)

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
        """The batcher thread: the embeddings of ``batch`` (each image and adapter once) under
        the model lock, in one mixed-adapter forward (an uncompiled encoder) or one folded
        forward per adapter (a compiled one); settles every future with (embedding,
        cache_hit)."""
        with self._table.lock.after_writers():
            self._run_prefixes([p for p in batch if p.item.prefix_only])
            groups: dict[str, tuple[AdapterSlot | None, dict[str, list[Pending]]]] = {}
            for pending in batch:
                job = pending.item
                if job.prefix_only:
                    continue
                try:  # live is resolved now: a swap may have happened since the request
                    slot = self.slot(job.target)
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
            if self.encoder.mixes:
                self._run_mixed(groups)
            else:
                for key, group in groups.items():
                    self._run_folded({key: group})

    def _run_mixed(self, groups: dict[str, tuple[AdapterSlot | None, dict[str, list[Pending]]]]
                   ) -> None:
        """One forward for every group, each image with its group's adapter (images of one
        adapter next to each other, so each adapter's update is one run of rows)."""
        if not groups:
            return
        try:
            keys = [self._table.encoder_key(slot) for slot, _ in groups.values()]
        except Exception as exc:
            self._fail(groups, exc)
            return
        rows = [(key, waiting) for key, (_, by_image) in zip(keys, groups.values(), strict=True)
                for waiting in by_image.values()]
        try:
            features = self._forward([waiting[0].item for _, waiting in rows],
                                     [key for key, _ in rows])
        except Exception as exc:
            self._fail(groups, exc)
            return
        index = 0
        for key, (slot, by_image) in groups.items():
            for image_id, waiting in by_image.items():
                self._settle(image_id, waiting, features[index : index + 1], slot, key)
                index += 1

    def _run_folded(self, groups: dict[str, tuple[AdapterSlot | None, dict[str, list[Pending]]]]
                    ) -> None:
        """One group: its adapter folded into the weights, one forward."""
        ((key, (slot, by_image)),) = groups.items()
        try:
            self._fold(slot)
            features = self._forward([waiting[0].item for waiting in by_image.values()])
        except Exception as exc:
            self._fail(groups, exc)
            return
        for index, (image_id, waiting) in enumerate(by_image.items()):
            self._settle(image_id, waiting, features[index : index + 1], slot, key)

    @staticmethod
    def _fail(groups: dict, exc: BaseException) -> None:
        for _, by_image in groups.values():
            for waiting in by_image.values():
                for pending in waiting:
                    pending.future.set_exception(exc)

    def _settle(self, image_id: str, waiting: list[Pending], features: torch.Tensor,
                slot: AdapterSlot | None, key: str) -> None:
        prepared = waiting[0].item.prepared
        encoded = EncodedImage(image_id, features.clone(), prepared.original_size,
                               prepared.input_size, slot_label(slot), key)
        # Stored under the lock: once a swap has dropped a version, nothing re-adds it.
        self._cache.put((image_id, key), encoded)
        self.encodes += 1
        for position, pending in enumerate(waiting):
            pending.future.set_result((encoded, position > 0))

    def _run_prefixes(self, batch: list[Pending[_EncodeJob]]) -> None:
        """Tokens entering each job's block, one prefix forward per block among ``batch``;
        the blocks before it are first restored to base if an adapter is folded there. Caller
        holds the model lock."""
        by_block: dict[int, list[Pending[_EncodeJob]]] = {}
        for pending in batch:
            by_block.setdefault(pending.item.block, []).append(pending)
        for block, waiting in by_block.items():
            try:
                if self.encoder.folds_before(block):
                    self._fold(None)
                tokens = self.encoder.prefix(torch.cat([p.item.prepared.pixels
                                                        for p in waiting]), block)
            except Exception as exc:
                for pending in waiting:
                    pending.future.set_exception(exc)
                continue
            for index, pending in enumerate(waiting):
                pending.future.set_result((tokens[index : index + 1].clone(), False))

    def _forward(self, jobs: list[_EncodeJob], adapters: list[str | None] | None = None
                 ) -> torch.Tensor:
        """Embeddings B x C x h x w of ``jobs`` (one per image), each with its entry of
        ``adapters`` (encoder bank keys; None: with what is folded now).

        When some jobs carry their tokens entering one block k (``auto``: the router's
        prefix) and no adapter of the batch reaches below k, the encoder runs from block k:
        the other images' prefix up to k, then one suffix for all. Otherwise every image runs
        from its pixels."""
        self.forwards += 1
        carried = {job.block for job in jobs if job.tokens is not None}
        if len(carried) == 1:
            block = carried.pop()
            below = self.encoder.folds_before(block) or any(
                (first := self.encoder.bank.first_block(key)) is not None and first < block
                for key in adapters or ())
            fresh = [job for job in jobs if job.tokens is None]
            if not below and not (fresh and self.encoder.compiled):  # compiled: its graph
                made = iter(())
                if fresh:
                    tokens = self.encoder.prefix(torch.cat([job.prepared.pixels
                                                            for job in fresh]), block)
                    made = iter(tokens[i : i + 1] for i in range(len(fresh)))
                parts = [job.tokens if job.tokens is not None else next(made) for job in jobs]
                return self.encoder.suffix(_join(parts), block, adapters)
        return self.encoder(torch.cat([job.prepared.pixels for job in jobs]), adapters)

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
