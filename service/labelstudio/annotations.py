"""An annotation from a Label Studio webhook → its task, image URL and object masks.

Every ``brushlabels`` region is one object mask (Label Studio's brush RLE, decoded by
:mod:`service.labelstudio.brush_rle`), and so is every ``polygonlabels`` region (its points,
percent of the image, rasterised by :func:`service.labelstudio.polygons.polygons_to_mask`),
both checked against the region's ``original_width`` x ``original_height``; the caller checks
that size against the fetched image. Smart
``keypointlabels`` and ``rectanglelabels`` regions are the prompts that made the masks and
are skipped; any other region type is refused (UnsupportedResultTypeError). A cancelled
(skipped) annotation has no masks. Empty masks are dropped. Everything is checked before
anything is fetched or stored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from service.labelstudio.brush_rle import BrushRleError, decode_brush_rle
from service.labelstudio.context import PROMPT_TYPES
from service.labelstudio.errors import (
    InvalidRegionError,
    MalformedPayloadError,
    UnsupportedResultTypeError,
)
from service.labelstudio.label_config import LabelConfig
from service.labelstudio.polygons import check_points, polygons_to_mask

__all__ = ["MASK_TYPES", "MAX_REGIONS", "AnnotatedMasks", "annotated_masks", "check_id",
           "project_id_of"]

logger = logging.getLogger(__name__)

MASK_TYPES = ("brushlabels", "polygonlabels")
MAX_REGIONS = 256


@dataclass(frozen=True)
class AnnotatedMasks:
    """annotation / task: Label Studio ids; image_url: the task's image; size: (width,
    height) the masks were drawn at (None without masks); masks: H x W bool, non-empty;
    version: the annotation's ``updated_at`` (None when the payload has none)."""

    annotation: int
    task: int
    image_url: object
    size: tuple[int, int] | None
    masks: tuple[np.ndarray, ...]
    version: str | None = None


def check_id(value: object, what: str) -> int:
    """A Label Studio object id: a non-negative int (MalformedPayloadError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise MalformedPayloadError(f"{what} must be a non-negative integer id, got "
                                    f"{value!r}")
    return value


def _size(region: dict, where: str, max_pixels: int) -> tuple[int, int]:
    width, height = region.get("original_width"), region.get("original_height")
    for name, value in (("original_width", width), ("original_height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRegionError(f"{where}.{name} must be a positive integer, got "
                                     f"{value!r}")
    assert isinstance(width, int) and isinstance(height, int)
    if width * height > max_pixels:
        raise BrushRleError(f"{where}: a {width} x {height} mask is larger than the "
                            f"{max_pixels} pixels accepted")
    return width, height


def annotated_masks(annotation: object, task: object, config: LabelConfig,
                    max_pixels: int) -> AnnotatedMasks:
    """The masks of ``annotation`` (a webhook's ``annotation`` object, or one of a task that
    Label Studio's API lists) on ``task`` (its ``task`` object), whose image is the one
    ``config`` names."""
    if not isinstance(annotation, dict) or not isinstance(task, dict):
        raise MalformedPayloadError("the webhook needs 'annotation' and 'task' objects")
    annotation_id = check_id(annotation.get("id"), "annotation.id")
    task_id = check_id(task.get("id"), "task.id")
    if annotation.get("task", task_id) != task_id:
        raise MalformedPayloadError(f"annotation {annotation_id} belongs to task "
                                    f"{annotation.get('task')!r}, not to task {task_id}")
    data = task.get("data")
    image_url = data.get(config.image_key) if isinstance(data, dict) else None
    regions = annotation.get("result", [])
    if not isinstance(regions, list) or len(regions) > MAX_REGIONS:
        raise InvalidRegionError(f"annotation.result must be a list of at most {MAX_REGIONS} "
                                 "regions")
    if annotation.get("was_cancelled") is True:
        regions = []
    masks: list[np.ndarray] = []
    size: tuple[int, int] | None = None
    for i, region in enumerate(regions):
        where = f"annotation.result[{i}]"
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            raise InvalidRegionError(f"{where} must be an object with a 'value' object")
        kind = region.get("type")
        if kind in PROMPT_TYPES:
            continue
        if kind not in MASK_TYPES:
            raise UnsupportedResultTypeError(
                f"{where}: type {kind!r} is not supported (regcl learns from brushlabels "
                f"masks and polygonlabels polygons; {', '.join(PROMPT_TYPES)} prompts are "
                "skipped)")
        value = region["value"]
        here = _size(region, where, max_pixels)
        if size is not None and here != size:
            raise BrushRleError(f"{where} is {here[0]} x {here[1]} but an earlier mask is "
                                f"{size[0]} x {size[1]}")
        size = here
        if kind == "polygonlabels":
            points = check_points(value.get("points"), where)
            pixels = points * np.array([here[0] / 100, here[1] / 100])
            mask = polygons_to_mask([pixels], here[0], here[1])
        else:
            if value.get("format", "rle") != "rle":
                raise InvalidRegionError(f"{where}: brush format {value.get('format')!r} is "
                                         "not supported (only 'rle')")
            try:
                mask = decode_brush_rle(value.get("rle"), here[1], here[0])
            except BrushRleError as exc:
                raise BrushRleError(f"{where}: {exc}") from None
        if mask.any():
            masks.append(mask)
        else:
            logger.info("annotation %d: %s is an empty mask; skipped", annotation_id, where)
    version = annotation.get("updated_at")
    if version is not None and (not isinstance(version, str) or not 0 < len(version) <= 64):
        raise MalformedPayloadError(f"annotation.updated_at must be a time stamp, got "
                                    f"{version!r}")
    return AnnotatedMasks(annotation_id, task_id, image_url, size if masks else None,
                          tuple(masks), version)


def project_id_of(project: object) -> int:
    """A project id from ``"<id>.<timestamp>"`` (what /setup, /predict and /train carry),
    an int, or a webhook's ``project`` object."""
    if project is None:
        raise MalformedPayloadError("the request names no project")
    if isinstance(project, dict):
        project = project.get("id")
    if isinstance(project, str):
        head = project.split(".", 1)[0]
        project = int(head) if head.isdigit() and len(head) < 19 else project
    return check_id(project, "project id")
