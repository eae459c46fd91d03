"""Masks → polygons → masks: the traced and simplified outline covers the mask it came from
(IoU >= 0.95 for shapes of a realistic size, each connected part its own polygon), and a
polygon annotation (percent points) rasterises to the pixels whose centres lie inside it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from service.labelstudio.errors import InvalidRegionError
from service.labelstudio.polygons import (
    TOLERANCE_PX,
    check_points,
    mask_to_polygons,
    polygons_to_mask,
)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r


def _shapes() -> dict[str, np.ndarray]:
    h, w = 120, 160
    blob = _disc(h, w, 60, 60, 30) | _disc(h, w, 40, 95, 18)
    ring = _disc(h, w, 60, 80, 40) & ~_disc(h, w, 60, 80, 5)  # a polygon fills the small hole
    flower = _disc(h, w, 60, 80, 22)
    for k in range(8):  # a wavy edge
        angle = 2 * np.pi * k / 8
        flower |= _disc(h, w, 60 + 26 * np.sin(angle), 80 + 26 * np.cos(angle), 9)
    return {"blob": blob, "ring": ring, "flower": flower,
            "two": _disc(h, w, 30, 30, 20) | _disc(h, w, 80, 120, 25)}


@pytest.mark.parametrize("name", ["blob", "ring", "flower", "two"])
def test_traced_polygons_cover_the_mask(name):
    mask = _shapes()[name]
    polygons = mask_to_polygons(mask)
    assert polygons and all(p.shape[1] == 2 and len(p) >= 3 for p in polygons)
    back = polygons_to_mask(polygons, mask.shape[1], mask.shape[0])
    iou = _iou(back, mask)
    assert iou >= 0.95, (name, iou)
    # rasterised independently (PIL's polygon fill) it covers the mask as well
    image = Image.new("1", (mask.shape[1], mask.shape[0]))
    for xy in polygons:
        ImageDraw.Draw(image).polygon([(x - 0.5, y - 0.5) for x, y in xy], fill=1)
    assert _iou(np.array(image, dtype=bool), mask) >= 0.95


def test_each_connected_part_is_a_polygon_largest_first_and_simplified():
    mask = _shapes()["two"]
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    areas = [polygons_to_mask([p], 160, 120).sum() for p in polygons]
    assert areas[0] > areas[1]
    # a circle of radius 25 traced pixel by pixel has ~150 boundary points; simplified far fewer
    assert len(polygons[0]) < 60
    # no vertex lies further than the tolerance (plus the half pixel of the 0.5 level) from
    # the mask's edge: each vertex is within 1 + tolerance of a mask pixel centre
    ys, xs = np.nonzero(mask)
    centres = np.stack([xs + 0.5, ys + 0.5], axis=1)
    for xy in polygons:
        nearest = np.sqrt(((xy[:, None, :] - centres[None]) ** 2).sum(-1)).min(1)
        assert nearest.max() <= 1.0 + TOLERANCE_PX


def test_specks_and_empty_masks_give_no_polygon():
    mask = np.zeros((20, 20), dtype=bool)
    assert mask_to_polygons(mask) == []
    mask[5, 5] = True
    assert mask_to_polygons(mask) == []


@pytest.mark.parametrize("points", [
    None, [], [[1, 2], [3, 4]], [[1, 2], [3, 4], [5]], [[1, 2], [3, 4], [5, "6"]],
    [[1, 2], [3, 4], [5, float("nan")]], [[1, 2], [3, 4], [5, 101]], [[1, 2], [3, 4], [-1, 5]],
    [[1, 2], [3, 4], [True, 5]], [[0, 0]] * 10_001, "[[1, 2], [3, 4], [5, 6]]",
])
def test_malformed_points_are_refused(points):
    with pytest.raises(InvalidRegionError):
        check_points(points, "annotation.result[0]")


def test_a_polygon_in_percent_rasterises_at_pixel_centres():
    points = check_points([[25, 25], [75, 25], [75, 75], [25, 75]], "r")
    mask = polygons_to_mask([points * np.array([40 / 100, 20 / 100])], 40, 20)
    assert mask.sum() == 20 * 10 and mask[5:15, 10:30].all()
