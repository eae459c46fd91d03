"""Datasets of any image size → tensors at the model's input size, the way SAM sees images.

:class:`segment_anything.SamPredictor` resizes the longest side to the encoder's input size
(``ResizeLongestSide``) and pads right and bottom to a square with zeros *after* normalising,
i.e. with the pixel mean before normalising. :func:`to_model_input` does the same to the images
(kept in [0, 255], so :func:`regcl.models.decoding.preprocess` turns the padding into zeros)
and resizes each mask with the same transform (bilinear, then > 127), padding it with
background. Prompts sampled inside the masks then fall on the object in the padded frame.
Images that already have the model's size (the synthetic domains) pass through unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from regcl.data.types import SampleDataset
from regcl.errors import DataError

__all__ = [
    "DomainTensors",
    "iter_model_input",
    "load_domain",
    "sample_indices",
    "split_holdout",
    "to_model_input",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DomainTensors:
    """images: N x 3 x S x S float32 in [0, 255] (padding = pixel mean); masks: N x S x S bool
    (never empty); names: the samples' names; dropped: samples whose object vanished when
    resized to S (too small to keep)."""

    images: torch.Tensor
    masks: torch.Tensor
    names: tuple[str, ...]
    dropped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Sequence[int]) -> DomainTensors:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return DomainTensors(self.images[idx], self.masks[idx],
                             tuple(self.names[i] for i in index))


def sample_indices(count: int, max_samples: int | None, seed: int) -> list[int]:
    """All of ``range(count)``, or a seeded random subset of ``max_samples`` (sorted)."""
    if max_samples is None or max_samples >= count:
        return list(range(count))
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:max_samples].tolist())


def to_model_input(dataset: SampleDataset, indices: Sequence[int], size: int,
                   pixel_mean: Sequence[float], *, allow_empty: bool = False) -> DomainTensors:
    """Samples ``indices`` of ``dataset`` at input size ``size`` (see the module doc).
    DataError if no sample keeps its object, unless ``allow_empty``."""
    transform = ResizeLongestSide(size)
    images = torch.empty(len(indices), 3, size, size, dtype=torch.float32)
    images[:] = torch.as_tensor(list(pixel_mean), dtype=torch.float32).view(1, 3, 1, 1)
    masks = torch.zeros(len(indices), size, size, dtype=torch.bool)
    kept: list[str] = []
    for index in indices:
        sample = dataset[index]
        image, mask = sample.image, sample.mask
        if max(image.shape[:2]) != size:
            image = transform.apply_image(image)
            mask = transform.apply_image(mask.astype(np.uint8) * 255) > 127
        if not mask.any():
            logger.debug("sample %s: the object vanished at %d px; dropped", sample.name, size)
            continue
        h, w = mask.shape
        row = len(kept)
        images[row, :, :h, :w] = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        masks[row, :h, :w] = torch.from_numpy(np.ascontiguousarray(mask))
        kept.append(sample.name)
    dropped = len(indices) - len(kept)
    if not kept and not allow_empty:
        raise DataError(f"none of the {len(indices)} samples keeps its object at {size} px")
    if dropped:  # copies, so the unused rows are freed
        logger.info("dropped %d of %d samples whose object vanished at %d px", dropped,
                    len(indices), size)
        images, masks = images[: len(kept)].clone(), masks[: len(kept)].clone()
    return DomainTensors(images, masks, tuple(kept), dropped)


def iter_model_input(dataset: SampleDataset, indices: Sequence[int], size: int,
                     pixel_mean: Sequence[float], chunk: int) -> Iterator[DomainTensors]:
    """:func:`to_model_input` ``chunk`` samples at a time (memory stays bounded however many
    samples there are); DataError if no sample at all keeps its object."""
    kept = 0
    for start in range(0, len(indices), chunk):
        part = to_model_input(dataset, indices[start : start + chunk], size, pixel_mean,
                              allow_empty=True)
        if len(part):
            kept += len(part)
            yield part
    if not kept:
        raise DataError(f"none of the {len(indices)} samples keeps its object at {size} px")


def load_domain(dataset: SampleDataset, size: int, pixel_mean: Sequence[float], *,
                max_samples: int | None = None, seed: int = 0) -> DomainTensors:
    """The dataset (or a seeded subset of ``max_samples``) at input size ``size``."""
    return to_model_input(dataset, sample_indices(len(dataset), max_samples, seed), size,
                          pixel_mean)


def split_holdout(data: DomainTensors, fraction: float, seed: int
                  ) -> tuple[DomainTensors, DomainTensors]:
    """(train, holdout): a seeded random ``fraction`` (at least one sample) is held out."""
    n = len(data)
    if n < 2:
        raise DataError(f"need at least 2 usable samples to train and hold one out, got {n}")
    held = min(max(1, round(n * fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return data.subset(sorted(perm[held:])), data.subset(sorted(perm[:held]))
