"""Plain data records shared by every dataset in regcl."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One promptable-segmentation example: an image and the mask of one object in it.

    image: H x W x 3, uint8, RGB.
    mask:  H x W, bool, True on the object.
    name:  a stable identifier (file stem; ``"<file_stem>:<ann_id>"`` for COCO; index for
           synthetic data).
    """

    image: np.ndarray
    mask: np.ndarray
    name: str = ""


class SampleDataset(Sequence[Sample]):
    """A dataset of :class:`Sample`: subclasses give ``__len__`` and ``_load(i)`` for
    ``0 <= i < len``; indexing (negative indices, slices, IndexError past the end, so that
    iteration stops as ``Sequence`` wants) is handled here once."""

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> Sample:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self._load(i) for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self._load(index % len(self))
