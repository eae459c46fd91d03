"""Masks ↔ Label Studio polygons (``polygonlabels`` regions).

Label Studio stores a polygon as its vertices in percent of the image's width and height,
``[[x, y], ...]`` (``value.points``), closed. Coordinates here are continuous image
coordinates: pixel ``(row i, column j)`` covers ``[j, j + 1] x [i, i + 1]``, its centre at
``(j + 0.5, i + 0.5)``.

- :func:`mask_to_polygons`: one polygon per connected part of a mask (8-connected), its outer
  boundary (holes filled: a Label Studio polygon has none) traced at the 0.5 level between
  pixel centres by scikit-image's marching squares (``measure.find_contours``), then
  simplified with Douglas-Peucker (``measure.approximate_polygon``) so that no boundary point
  moves more than :data:`TOLERANCE_PX` pixels. Parts smaller than :data:`MIN_AREA_PX` pixels
  are dropped.
- :func:`polygons_to_mask`: the pixels whose centres lie inside a polygon (scikit-image's
  ``draw.polygon``, even-odd), of all polygons; what a polygon annotation trains as.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage import draw, measure

from service.labelstudio.errors import InvalidRegionError

__all__ = [
    "MAX_POINTS",
    "MIN_AREA_PX",
    "TOLERANCE_PX",
    "check_points",
    "mask_to_polygons",
    "polygons_to_mask",
]

TOLERANCE_PX = 0.75
"""Douglas-Peucker tolerance: the simplified polygon is within this many pixels of the traced
boundary (which itself runs half a pixel outside the outermost pixel centres)."""
MIN_AREA_PX = 4
MAX_POINTS = 10_000
"""Most vertices regcl reads in one polygon (and writes: a simplified outline has far fewer)."""
_SLACK = 1e-6


def mask_to_polygons(mask: np.ndarray, tolerance: float = TOLERANCE_PX
                     ) -> list[np.ndarray]:
    """The outer boundary of each connected part of ``mask`` (H x W bool), largest part
    first, as N x 2 (x, y) arrays of image coordinates (N >= 3, not repeating the first
    vertex)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return []
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    polygons: list[tuple[float, np.ndarray]] = []
    for index in np.argsort(-sizes):
        if sizes[index] < MIN_AREA_PX:
            continue
        part = ndimage.binary_fill_holes(labels == index + 1)
        padded = np.pad(part, 1).astype(np.float32)
        contours = measure.find_contours(padded, 0.5)
        if not contours:
            continue
        outline = max(contours, key=len)  # the outer boundary: holes were filled
        simplified = measure.approximate_polygon(outline, tolerance)
        if len(simplified) > 1 and np.allclose(simplified[0], simplified[-1]):
            simplified = simplified[:-1]
        if len(simplified) < 3:
            continue
        # (row, col) in the padded grid of pixel centres → (x, y) image coordinates
        xy = np.stack([simplified[:, 1] - 1 + 0.5, simplified[:, 0] - 1 + 0.5], axis=1)
        polygons.append((float(sizes[index]), xy))
    return [xy for _, xy in polygons]


def polygons_to_mask(polygons: Sequence[np.ndarray], width: int, height: int) -> np.ndarray:
    """H x W bool: the pixels whose centres lie inside any of ``polygons`` (N x 2 (x, y)
    image coordinates)."""
    mask = np.zeros((height, width), dtype=bool)
    for xy in polygons:
        rows, cols = draw.polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=(height, width))
        mask[rows, cols] = True
    return mask


def check_points(points: object, where: str) -> np.ndarray:
    """Label Studio's ``value.points`` (percent) as an N x 2 float array, checked: a list of
    3 to :data:`MAX_POINTS` [x, y] pairs of finite numbers in [0, 100]
    (InvalidRegionError otherwise)."""
    if not isinstance(points, list) or not 3 <= len(points) <= MAX_POINTS:
        raise InvalidRegionError(f"{where}.value.points must be a list of 3 to {MAX_POINTS} "
                                 "[x, y] points")
    out = np.empty((len(points), 2), dtype=np.float64)
    for k, point in enumerate(points):
        if not isinstance(point, list | tuple) or len(point) != 2:
            raise InvalidRegionError(f"{where}.value.points[{k}] must be an [x, y] pair")
        for c, value in enumerate(point):
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or not -_SLACK <= value <= 100 + _SLACK:
                raise InvalidRegionError(f"{where}.value.points[{k}] must hold finite numbers "
                                         f"from 0 to 100 (percent), got {point!r}")
            out[k, c] = min(max(float(value), 0.0), 100.0)
    return out
