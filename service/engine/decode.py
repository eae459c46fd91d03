"""Masks from image embeddings: the one decode path of every route.

LoRA sits only in the image encoder (:func:`service.engine.slots.check_adapter_files` refuses
anything else before the model is touched), so the prompt encoder and mask decoder are the
same for every adapter and decoding needs no lock. It runs on one batcher thread
(``regcl-decoder``). The requests queued while a batch runs - one prompt from
``/v1/segment``, up to 64 from ``/v1/segment/batch`` - are grouped by prompt form (point
count, box, mask input, multimask), and each group decodes in one mask-decoder call
(:func:`decode_rows`), each row with its own cached
:class:`~service.engine.caches.EncodedImage`. A row alone gives exactly what
``SamPredictor.predict`` gives, bit for bit (the same operations in the same order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from regcl.models import predict_masks_batched
from service.engine.batching import Batcher, Pending
from service.engine.caches import EncodedImage
from service.engine.prompt_checks import Prompt

if TYPE_CHECKING:
    from service.engine.auto_routing import AutoRoute

__all__ = ["DecodeJob", "PromptDecoder", "SegmentResult", "decode_rows"]


@dataclass(frozen=True)
class SegmentResult:
    """Masks for one prompt on one image.

    masks: N x H x W bool at the image's size (N = 3 with multimask, else 1). scores: N float32
    predicted IoU. low_res_logits: N x h x w float32 (h = w = 4 x the embedding size; 256 for
    SAM), to pass back as ``mask_input``. adapter_version: the label of the adapter whose
    embedding was used (``base``, ``live:3``, ``domain:polyp``). route: for ``adapter:
    "auto"``, what the domain router decided (:class:`~service.engine.auto_routing.AutoRoute`).
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray
    adapter_version: str
    image_id: str
    cache_hit: bool
    route: AutoRoute | None = None


@dataclass(frozen=True)
class DecodeJob:
    """One checked prompt (within its image's bounds) on one embedding."""

    encoded: EncodedImage
    prompt: Prompt
    multimask: bool
    cache_hit: bool

    @property
    def form(self) -> tuple[int | None, bool, bool, bool]:
        """Prompts of one form decode together: (point count, box?, mask_input?, multimask)."""
        prompt = self.prompt
        return (None if prompt.point_coords is None else len(prompt.point_coords),
                prompt.box is not None, prompt.mask_input is not None, self.multimask)


@torch.no_grad()
def decode_rows(sam: Sam, transform: ResizeLongestSide, jobs: Sequence[DecodeJob]
                ) -> list[SegmentResult]:
    """B prompts of one form, each on its own embedding: one mask-decoder call
    (:func:`regcl.models.predict_masks_batched`), then each row's masks back to its image's
    size as ``SamPredictor.predict`` does. Prompts are in original-image pixels (``N x 2
    (x, y)`` points, ``x0, y0, x1, y1`` box, ``1 x h x w`` mask logits)."""
    device = sam.device
    first = jobs[0].prompt
    coords = labels = boxes = masks_in = None
    if first.point_coords is not None:
        coords = torch.as_tensor(np.stack([transform.apply_coords(
            j.prompt.point_coords, j.encoded.original_size) for j in jobs]),
            dtype=torch.float, device=device)
        labels = torch.as_tensor(np.stack([j.prompt.point_labels for j in jobs]),
                                 dtype=torch.int, device=device)
    if first.box is not None:
        boxes = torch.as_tensor(np.stack([transform.apply_boxes(
            j.prompt.box, j.encoded.original_size)[0] for j in jobs]),
            dtype=torch.float, device=device)
    if first.mask_input is not None:
        masks_in = torch.as_tensor(np.stack([j.prompt.mask_input for j in jobs]),
                                   dtype=torch.float, device=device)
    shared = jobs[0].encoded.features
    if all(j.encoded.features is shared for j in jobs):  # several prompts on one image
        features = shared.expand(len(jobs), -1, -1, -1)
    else:
        features = torch.cat([j.encoded.features for j in jobs])
    low_res, iou = predict_masks_batched(sam, features, coords, labels, boxes, masks_in,
                                         multimask_output=jobs[0].multimask)
    scores_np = iou.float().cpu().numpy()
    low_np = low_res.float().cpu().numpy()
    sizes = {(j.encoded.input_size, j.encoded.original_size) for j in jobs}
    together = None
    if len(sizes) == 1:  # one image size: every row upscaled in one call
        together = (sam.postprocess_masks(low_res, *next(iter(sizes)))
                    > sam.mask_threshold).cpu().numpy()
    results = []
    for row, job in enumerate(jobs):
        if together is not None:
            masks = together[row]
        else:
            masks = (sam.postprocess_masks(low_res[row : row + 1], job.encoded.input_size,
                                           job.encoded.original_size)
                     > sam.mask_threshold)[0].cpu().numpy()
        results.append(SegmentResult(masks, scores_np[row], low_np[row],
                                     job.encoded.adapter_version, job.encoded.image_id,
                                     job.cache_hit))
    return results


class PromptDecoder:
    """The decoder thread (see the module docstring).

    Args:
        sam: the model whose prompt encoder and mask decoder run (adapters never touch them).
        max_rows: most prompts in one mask-decoder call (and most requests taken at once).
        threads: torch intra-op threads of every decode, on whichever thread it runs.
    """

    def __init__(self, sam: Sam, max_rows: int, threads: int = 1) -> None:
        self.max_rows = max_rows
        self._threads = threads
        self._sam = sam
        self._transform = ResizeLongestSide(sam.image_encoder.img_size)
        # Decodes never wait for company: whatever queued while one batch ran is the next.
        self._batcher: Batcher[tuple[DecodeJob, ...]] = Batcher(
            self._run_batch, max_batch=max_rows, max_wait_s=0.0, name="regcl-decoder")

    def close(self) -> None:
        self._batcher.close()

    def decode(self, jobs: Sequence[DecodeJob]) -> list[SegmentResult]:
        """Results of ``jobs``, in their order."""
        if not jobs:
            return []
        return self._batcher.run(tuple(jobs))

    def _run_batch(self, batch: list[Pending[tuple[DecodeJob, ...]]]) -> None:
        """Every prompt of every queued request, grouped by form, at most ``max_rows`` per
        decoder call; a failed call fails the requests that had a prompt in it."""
        if torch.get_num_threads() != self._threads:
            # OpenMP's thread count is per thread: the engine set it on the thread that built
            # it, and threads that existed then (the event loop's) keep the default, whose
            # spinning second OpenMP thread doubled a decode's time on a busy machine.
            torch.set_num_threads(self._threads)
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for request, pending in enumerate(batch):
            for row, job in enumerate(pending.item):
                groups.setdefault(job.form, []).append((request, row))
        results: list[list[SegmentResult | None]] = [[None] * len(p.item) for p in batch]
        failed: set[int] = set()
        for members in groups.values():
            for start in range(0, len(members), self.max_rows):
                chunk = members[start : start + self.max_rows]
                try:
                    decoded = decode_rows(self._sam, self._transform,
                                          [batch[request].item[row] for request, row in chunk])
                except Exception as exc:
                    for request, _ in chunk:
                        if request not in failed:
                            failed.add(request)
                            batch[request].future.set_exception(exc)
                    continue
                for (request, row), result in zip(chunk, decoded, strict=True):
                    results[request][row] = result
        for request, pending in enumerate(batch):
            if request not in failed:
                pending.future.set_result(results[request])
