"""Plain data records shared by every dataset in regcl."""

from __future__ import annotations

from dataclasses import dataclass

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
