"""Validation of segmentation prompts into the arrays ``SamPredictor.predict`` takes.

Coordinates are pixels of the image as uploaded: x to the right in [0, W], y down in [0, H]
(the far edge included, as SAM's own coordinate transform allows). Every refusal is a typed
:class:`~service.engine.errors.PromptError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.engine.errors import (
    EmptyPromptError,
    InvalidBoxError,
    InvalidLabelError,
    NonFiniteValueError,
    OutOfBoundsError,
    PromptShapeError,
    TooManyPointsError,
    ValueOutOfRangeError,
)

DEFAULT_MAX_POINTS = 64
MAX_MASK_INPUT_ABS = 1e6
"""Largest mask-input logit magnitude accepted. SAM's own low-res logits stay within tens;
values near the float32 maximum overflow in the prompt encoder and turn every score into NaN."""


@dataclass(frozen=True)
class Prompt:
    """A checked prompt. point_coords: N x 2 float64 (x, y); point_labels: N int32 (1
    foreground, 0 background); box: 4 float64 (x0, y0, x1, y1); mask_input: 1 x h x w float32
    low-resolution logits from an earlier prediction (h, w = 4 x the embedding size)."""

    point_coords: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None


def _as_float_array(value: object, what: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PromptShapeError(f"{what} must be numeric and rectangular: {exc}") from exc
    return array


def check_prompt(
    point_coords: object = None,
    point_labels: object = None,
    box: object = None,
    mask_input: object = None,
    *,
    mask_input_size: tuple[int, int],
    max_points: int = DEFAULT_MAX_POINTS,
) -> Prompt:
    """Check shapes and values of a prompt (everything but the image bounds).

    Args:
        point_coords: N x 2 (x, y) pixels, or None. N = 0 counts as no points.
        point_labels: N labels in {0, 1}; required with points, refused without.
        box: 4 (or 1 x 4) x0, y0, x1, y1 pixels, or None.
        mask_input: h x w or 1 x h x w logits with (h, w) = ``mask_input_size``, or None.
    """
    coords = labels = box_array = mask = None
    if point_coords is not None or point_labels is not None:
        if point_coords is None or point_labels is None:
            raise PromptShapeError("point_coords and point_labels must be given together")
        coords = _as_float_array(point_coords, "point_coords")
        if coords.size == 0:
            coords = coords.reshape(0, 2)
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise PromptShapeError(f"point_coords must be N x 2, got shape {coords.shape}")
        labels = _check_labels(point_labels, coords.shape[0])
        if coords.shape[0] > max_points:
            raise TooManyPointsError(f"{coords.shape[0]} points; at most {max_points} allowed")
        if not np.isfinite(coords).all():
            raise NonFiniteValueError("point_coords contain NaN or infinite values")
        if coords.shape[0] == 0:
            coords = labels = None
    if box is not None:
        box_array = _as_float_array(box, "box")
        if box_array.shape not in ((4,), (1, 4)):
            raise PromptShapeError(f"box must have 4 values (x0, y0, x1, y1), got shape "
                                   f"{box_array.shape}")
        box_array = box_array.reshape(4)
        if not np.isfinite(box_array).all():
            raise NonFiniteValueError("box contains NaN or infinite values")
        x0, y0, x1, y1 = box_array
        if x1 < x0 or y1 < y0:
            raise InvalidBoxError(f"box must have x0 <= x1 and y0 <= y1, got {box_array.tolist()}")
    if mask_input is not None:
        mask = _as_float_array(mask_input, "mask_input")
        if mask.ndim == 2:
            mask = mask[None]
        if mask.shape != (1, *mask_input_size):
            raise PromptShapeError(f"mask_input must be {mask_input_size[0]} x "
                                   f"{mask_input_size[1]} low-res logits, got shape {mask.shape}")
        if not np.isfinite(mask).all():
            raise NonFiniteValueError("mask_input contains NaN or infinite values")
        if np.abs(mask).max() > MAX_MASK_INPUT_ABS:
            raise ValueOutOfRangeError(f"mask_input logits must lie within "
                                       f"+-{MAX_MASK_INPUT_ABS:g}, got "
                                       f"{float(np.abs(mask).max()):g}")
        mask = mask.astype(np.float32)
    if coords is None and box_array is None and mask is None:
        raise EmptyPromptError("the prompt has no points, no box and no mask input")
    return Prompt(coords, labels, box_array, mask)


def _check_labels(point_labels: object, n: int) -> np.ndarray:
    try:
        labels = np.asarray(point_labels)
    except (TypeError, ValueError) as exc:
        raise PromptShapeError(f"point_labels must be a list of numbers: {exc}") from exc
    if labels.size == 0:
        labels = labels.reshape(0)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise PromptShapeError(f"point_labels must have one label per point ({n}), got shape "
                               f"{labels.shape}")
    if labels.dtype.kind not in "biuf":
        raise InvalidLabelError(f"point labels must be 0 or 1, got dtype {labels.dtype}")
    if not np.isin(labels, (0, 1)).all():
        bad = labels[~np.isin(labels, (0, 1))][:3].tolist()
        raise InvalidLabelError(f"point labels must be 0 (background) or 1 (foreground), "
                                f"got {bad}")
    return labels.astype(np.int32)


def check_bounds(prompt: Prompt, image_size: tuple[int, int]) -> None:
    """Refuse points and boxes outside the H x W image (0 <= x <= W, 0 <= y <= H)."""
    height, width = image_size
    if prompt.point_coords is not None:
        xs, ys = prompt.point_coords[:, 0], prompt.point_coords[:, 1]
        outside = (xs < 0) | (xs > width) | (ys < 0) | (ys > height)
        if outside.any():
            first = prompt.point_coords[outside][0].tolist()
            raise OutOfBoundsError(f"{int(outside.sum())} point(s) outside the {width} x "
                                   f"{height} image (e.g. {first})")
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise OutOfBoundsError(f"box {prompt.box.tolist()} is outside the {width} x "
                                   f"{height} image")
