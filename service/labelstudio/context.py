"""An interactive ``context`` from Label Studio → a SAM prompt.

When an annotator places a smart keypoint or draws a smart rectangle, Label Studio posts the
regions of that interaction as ``params.context.result``::

    {"type": "keypointlabels", "is_positive": true, "original_width": 640, ...,
     "value": {"x": 49.4, "y": 59.9, "keypointlabels": ["polyp"]}}
    {"type": "rectanglelabels", "value": {"x": 10, "y": 20, "width": 30, "height": 15,
     "rotation": 0, "rectanglelabels": ["polyp"]}}

Coordinates are percent of the image's width and height. Keypoints become SAM points
(``is_positive`` false: a background point; absent: foreground), the last rectangle becomes
the box. Pixels are ``percent x size / 100`` of the fetched image (not ``original_width``,
which the client could get wrong), as floats, exactly what ``/v1/segment`` receives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from service.engine.errors import OutOfBoundsError
from service.labelstudio.errors import InvalidRegionError, UnsupportedResultTypeError

__all__ = ["PROMPT_TYPES", "ContextPrompt", "parse_context"]

PROMPT_TYPES = ("keypointlabels", "rectanglelabels")
MAX_REGIONS = 64
_SLACK = 1e-6  # percent: x + width may exceed 100 by rounding in the browser


@dataclass(frozen=True)
class ContextPrompt:
    """points: P x 2 (x, y) percent; labels: P of {0, 1}; box: (x0, y0, x1, y1) percent or
    None; label: the label the annotator chose (of the last region), if any."""

    points: tuple[tuple[float, float], ...]
    labels: tuple[int, ...]
    box: tuple[float, float, float, float] | None
    label: str | None

    def in_pixels(self, width: int, height: int
                  ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(point_coords P x 2, point_labels P, box 4) in pixels of a ``width x height``
        image, as ``SegmentationEngine.segment`` takes them (None where absent)."""
        coords = labels = box = None
        if self.points:
            coords = np.array([[x * width / 100, y * height / 100] for x, y in self.points],
                              dtype=np.float64)
            labels = np.array(self.labels, dtype=np.int64)
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            box = np.array([x0 * width / 100, y0 * height / 100, x1 * width / 100,
                            y1 * height / 100], dtype=np.float64)
        return coords, labels, box


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRegionError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidRegionError(f"{what} must be finite, got {value!r}")
    return float(value)


def _percent(value: object, what: str) -> float:
    number = _number(value, what)
    if not 0 <= number <= 100 + _SLACK:
        raise OutOfBoundsError(f"{what} = {number} lies outside the image (0 to 100 percent)")
    return min(number, 100.0)


def _label(value: dict, kind: str) -> str | None:
    names = value.get(kind)
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidRegionError(f"value.{kind} must be a list of label names")
    return names[0] if names else None


def parse_context(context: object) -> ContextPrompt | None:
    """The prompt in ``context.result`` (None when there is none: no interaction yet).
    Raises UnsupportedResultTypeError, InvalidRegionError or OutOfBoundsError."""
    if context is None:
        return None
    if not isinstance(context, dict):
        raise InvalidRegionError("params.context must be an object")
    regions = context.get("result")
    if regions is None or regions == []:
        return None
    if not isinstance(regions, list) or len(regions) > MAX_REGIONS:
        raise InvalidRegionError(f"context.result must be a list of at most {MAX_REGIONS} "
                                 "regions")
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    box = None
    label = None
    for i, region in enumerate(regions):
        where = f"context.result[{i}]"
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            raise InvalidRegionError(f"{where} must be an object with a 'value' object")
        kind, value = region.get("type"), region["value"]
        if kind not in PROMPT_TYPES:
            raise UnsupportedResultTypeError(
                f"{where}: type {kind!r} is not a prompt regcl takes (use smart "
                f"{' or '.join(PROMPT_TYPES)})")
        x, y = _percent(value.get("x"), f"{where}.value.x"), _percent(value.get("y"),
                                                                      f"{where}.value.y")
        label = _label(value, kind) or label
        if kind == "keypointlabels":
            positive = region.get("is_positive", True)
            if not isinstance(positive, bool):
                raise InvalidRegionError(f"{where}.is_positive must be true or false")
            points.append((x, y))
            labels.append(int(positive))
            continue
        width = _number(value.get("width"), f"{where}.value.width")
        height = _number(value.get("height"), f"{where}.value.height")
        if _number(value.get("rotation", 0), f"{where}.value.rotation") % 360 != 0:
            raise InvalidRegionError(f"{where}: rotated rectangles are not supported")
        if width < 0 or height < 0:
            raise InvalidRegionError(f"{where}: width and height must not be negative")
        box = (x, y, _percent(x + width, f"{where} right edge"),
               _percent(y + height, f"{where} bottom edge"))
    return ContextPrompt(tuple(points), tuple(labels), box, label)
