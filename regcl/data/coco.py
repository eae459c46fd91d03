"""COCO-format instance segmentation as one binary-mask sample per annotated object.

The annotation file is parsed and checked eagerly: structure, image references, sizes, the
segmentation itself (polygons, uncompressed and compressed RLE are all converted to compressed
RLE once, which also gives each mask's exact pixel area for ``min_area``) and that every image
used exists under ``image_root``. Image pixels are read in ``__getitem__``.

Segmentations are checked before pycocotools sees them because its C code trusts its input: a
first polygon of four numbers is silently taken for a bounding box, and huge coordinates or
run-lengths that do not add up to H x W lead to huge allocations or invalid masks.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from regcl.data.images import DEFAULT_MAX_PIXELS, check_max_pixels, read_image_rgb
from regcl.data.types import Sample, SampleDataset
from regcl.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

_MAX_LISTED = 5


@dataclass(frozen=True)
class CocoImage:
    """One entry of the file's ``"images"`` list; ``path`` is resolved under ``image_root``."""

    id: int
    file_name: str
    height: int
    width: int
    path: Path


@dataclass(frozen=True)
class CocoInstance:
    """One kept annotation: its object's mask as compressed RLE of the image's H x W."""

    id: int
    image: CocoImage
    category_id: int | None
    rle: dict[str, Any]
    area: int


class CocoDataset(SampleDataset):
    """One :class:`Sample` per object instance of a COCO annotation file.

    ``sample.image`` is the whole image (H x W x 3 uint8 RGB), ``sample.mask`` that one
    instance (H x W bool), ``sample.name`` is ``f"{image_file_stem}:{annotation_id}"``. Samples
    are ordered by (image id, annotation id), so the instances of one image are adjacent.

    Args:
        annotation_file: COCO JSON with ``"images"`` and ``"annotations"`` lists.
        image_root: folder that the images' ``file_name`` are relative to.
        category_ids: keep only annotations of these categories (None keeps all).
        min_area: drop instances whose mask has fewer pixels than this.
        include_crowd: keep ``iscrowd=1`` annotations (regions of many objects); off by default
            because a crowd mask is not one promptable object.
        max_pixels: largest image (width x height) accepted.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_root: str | Path,
        *,
        category_ids: Iterable[int] | None = None,
        min_area: float = 1,
        include_crowd: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_root = Path(image_root)
        self.max_pixels = check_max_pixels(max_pixels)
        if isinstance(min_area, bool) or not isinstance(min_area, int | float) or min_area < 0:
            raise ConfigError(f"min_area must be a number >= 0, got {min_area!r}")
        wanted = None if category_ids is None else frozenset(category_ids)
        if wanted is not None and not wanted:
            raise ConfigError("category_ids is empty; pass None to keep every category")
        if not self.image_root.is_dir():
            raise DataError(f"image folder {self.image_root} does not exist or is not a folder")

        document = _load_json(self.annotation_file)
        where = str(self.annotation_file)
        images = _parse_images(document, self.image_root, where)
        if wanted is not None:
            _check_categories(document, wanted, where)

        instances: list[CocoInstance] = []
        seen_ids: set[int] = set()
        skipped = {"crowd": 0, "category": 0, "small": 0}
        for raw in _list_field(document, "annotations", where):
            ann_id = _int_field(raw, "id", f"{where}: an annotation")
            label = f"{where}: annotation {ann_id}"
            if ann_id in seen_ids:
                raise DataError(f"{label}: duplicate annotation id")
            seen_ids.add(ann_id)
            image_id = _int_field(raw, "image_id", label)
            image = images.get(image_id)
            if image is None:
                raise DataError(f"{label}: refers to image id {image_id}, which is not in images")
            crowd = raw.get("iscrowd", 0)
            if crowd not in (0, 1):  # True/False compare equal to 1/0 and pass too
                raise DataError(f"{label}: iscrowd must be 0 or 1, got {crowd!r}")
            if crowd and not include_crowd:
                skipped["crowd"] += 1
                continue
            category_id = None
            if wanted is not None or "category_id" in raw:
                category_id = _int_field(raw, "category_id", label)
            if wanted is not None and category_id not in wanted:
                skipped["category"] += 1
                continue
            if image.height * image.width > max_pixels:  # before any mask is rasterised
                raise DataError(
                    f"{label}: its image {image.id} ({image.file_name}) is {image.width} x "
                    f"{image.height}, more than max_pixels={max_pixels}"
                )
            if "segmentation" not in raw:
                raise DataError(f"{label}: has no 'segmentation'")
            rle = segmentation_to_rle(raw["segmentation"], image.height, image.width, label)
            area = int(mask_utils.area(rle))
            if area < min_area:
                skipped["small"] += 1
                continue
            instances.append(CocoInstance(ann_id, image, category_id, rle, area))

        if not instances:
            raise DataError(
                f"{where}: no annotations left (skipped {skipped['crowd']} crowd, "
                f"{skipped['category']} of other categories, {skipped['small']} smaller than "
                f"min_area={min_area})"
            )
        _check_files_exist({inst.image.id: inst.image for inst in instances}.values(), where)
        instances.sort(key=lambda inst: (inst.image.id, inst.id))
        self.instances: tuple[CocoInstance, ...] = tuple(instances)
        logger.info(
            "%s: %d instances kept; skipped %d crowd, %d of other categories, %d below min_area",
            where, len(instances), skipped["crowd"], skipped["category"], skipped["small"],
        )

    @property
    def annotation_ids(self) -> tuple[int, ...]:
        """Annotation id of each sample, in sample order."""
        return tuple(inst.id for inst in self.instances)

    def __len__(self) -> int:
        return len(self.instances)

    def _load(self, index: int) -> Sample:
        """Read instance ``index``: image H x W x 3 uint8 RGB, mask H x W bool."""
        inst = self.instances[index]
        image = read_image_rgb(inst.image.path, self.max_pixels)
        expected = (inst.image.height, inst.image.width)
        if image.shape[:2] != expected:
            raise DataError(
                f"{inst.image.path}: image is {image.shape[0]} x {image.shape[1]} (H x W) but "
                f"image id {inst.image.id} in {self.annotation_file} says {expected[0]} x "
                f"{expected[1]}"
            )
        try:
            mask = mask_utils.decode(inst.rle)
        except ValueError as exc:  # validated at construction, so this means a pycocotools bug
            raise DataError(f"annotation {inst.id}: cannot decode mask ({exc})") from exc
        return Sample(
            image=image,
            mask=np.ascontiguousarray(mask, dtype=bool),
            name=f"{Path(inst.image.file_name).stem}:{inst.id}",
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(annotation_file={str(self.annotation_file)!r}, "
            f"instances={len(self)})"
        )


def segmentation_to_rle(segmentation: Any, height: int, width: int, label: str) -> dict[str, Any]:
    """Check a COCO ``segmentation`` against an H x W image and return it as compressed RLE.

    Accepts a list of polygons (``[[x0, y0, x1, y1, ...], ...]``, pixel coordinates), an
    uncompressed RLE (``{"size": [H, W], "counts": [int, ...]}``, column-major run lengths
    starting with background) or a compressed RLE (``"counts"`` a string). Returns
    ``{"size": [H, W], "counts": bytes}`` for pycocotools. Raises DataError starting ``label``.
    """
    if isinstance(segmentation, list):
        polygons = [_check_polygon(poly, height, width, f"{label} polygon {i}")
                    for i, poly in enumerate(segmentation)]
        if not polygons:
            raise DataError(f"{label}: segmentation is an empty polygon list")
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if not isinstance(segmentation, dict) or "counts" not in segmentation:
        raise DataError(
            f"{label}: segmentation must be a polygon list or an RLE dict with 'size' and "
            f"'counts', got {type(segmentation).__name__}"
        )
    size = segmentation.get("size")
    if size != [height, width]:
        raise DataError(
            f"{label}: RLE size {size!r} does not match its image's [height, width] = "
            f"[{height}, {width}]"
        )
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise DataError(f"{label}: uncompressed RLE counts must be non-negative ints")
        total = sum(counts)
        encoded = None
    elif isinstance(counts, str):
        decoded = _decode_rle_string(counts)
        if decoded is None:
            raise DataError(f"{label}: compressed RLE counts string is malformed")
        total = sum(decoded)
        encoded = counts.encode("ascii")
    else:
        raise DataError(f"{label}: RLE counts must be a list or a string")
    if total != height * width:
        raise DataError(
            f"{label}: RLE run lengths add up to {total}, not height x width = {height * width}"
        )
    if encoded is None:
        return mask_utils.frPyObjects(segmentation, height, width)
    return {"size": [height, width], "counts": encoded}


def _check_polygon(poly: Any, height: int, width: int, label: str) -> list[float]:
    """Return one polygon as a list of floats, or raise DataError if it cannot be drawn safely."""
    if not isinstance(poly, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in poly
    ):
        raise DataError(f"{label}: a polygon must be a flat list of numbers")
    if len(poly) < 6 or len(poly) % 2:
        raise DataError(
            f"{label}: a polygon needs an even number (>= 6) of coordinates, got {len(poly)}"
        )
    # Annotators overshoot the border a little; far-off points only mean a corrupt file (and
    # make pycocotools allocate one entry per pixel of the outline).
    xs, ys = poly[0::2], poly[1::2]
    if not all(math.isfinite(v) for v in poly) or not (
        -width <= min(xs) and max(xs) <= 2 * width and -height <= min(ys) and max(ys) <= 2 * height
    ):
        raise DataError(
            f"{label}: polygon coordinates lie far outside the {width} x {height} image"
        )
    return [float(v) for v in poly]


def _decode_rle_string(text: str) -> list[int] | None:
    """Run lengths of a COCO compressed-RLE string, or None if it is malformed.

    A Python port of pycocotools' ``rleFrString``: each count is a little-endian base-32 varint
    in chars ``'0' + (0..63)`` (bit 5 = more, bit 4 of the last char = sign), and counts after
    the second are stored as differences from the count two places back.
    """
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                return None
            char = ord(text[pos]) - 48
            if not 0 <= char < 64:
                return None
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            pos += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            return None
        counts.append(value)
    return counts


def _load_json(path: Path) -> dict[str, Any]:
    """Parse the annotation file; DataError for a missing, unreadable or non-object file."""
    try:
        with path.open("rb") as handle:
            document = json.load(handle)
    except FileNotFoundError as exc:
        raise DataError(f"annotation file {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise DataError(f"{path}: cannot read annotation file ({exc})") from exc
    if not isinstance(document, dict):
        raise DataError(f"{path}: top level must be a JSON object, got {type(document).__name__}")
    return document


def _list_field(document: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    """``document[key]`` as a list of objects, or DataError."""
    if key not in document:
        raise DataError(f"{where}: missing the {key!r} list")
    items = document[key]
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise DataError(f"{where}: {key!r} must be a list of objects")
    return items


def _int_field(item: dict[str, Any], key: str, label: str) -> int:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{label}: {key!r} must be an int, got {value!r}")
    return value


def _parse_images(document: dict[str, Any], root: Path, where: str) -> dict[int, CocoImage]:
    """Check the ``"images"`` list and index it by id."""
    images: dict[int, CocoImage] = {}
    for raw in _list_field(document, "images", where):
        image_id = _int_field(raw, "id", f"{where}: an image")
        label = f"{where}: image {image_id}"
        if image_id in images:
            raise DataError(f"{label}: duplicate image id")
        file_name = raw.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise DataError(f"{label}: 'file_name' must be a non-empty string")
        relative = Path(file_name)
        # The file must lie under image_root: annotation files can come from uploads.
        if relative.is_absolute() or ".." in relative.parts:
            raise DataError(f"{label}: file_name {file_name!r} must be relative, without '..'")
        height = _int_field(raw, "height", label)
        width = _int_field(raw, "width", label)
        if height <= 0 or width <= 0:
            raise DataError(f"{label}: height and width must be positive, got {height} x {width}")
        images[image_id] = CocoImage(image_id, file_name, height, width, root / relative)
    return images


def _check_categories(document: dict[str, Any], wanted: frozenset[int], where: str) -> None:
    """Refuse a category filter naming ids that the file's ``"categories"`` does not list."""
    if "categories" not in document:
        return  # the list is optional in practice; annotations' ids are all we can check
    known = {
        _int_field(raw, "id", f"{where}: a category")
        for raw in _list_field(document, "categories", where)
    }
    unknown = sorted(wanted - known)
    if unknown:
        raise ConfigError(f"{where}: category_ids {unknown} are not among its categories")


def _check_files_exist(images: Iterable[CocoImage], where: str) -> None:
    """Every image that a kept annotation needs must exist under the image root."""
    missing = sorted({image.file_name for image in images if not image.path.is_file()})
    if missing:
        shown = ", ".join(missing[:_MAX_LISTED]) + (", ..." if len(missing) > _MAX_LISTED else "")
        raise DataError(
            f"{where}: {len(missing)} annotated images are missing under the image root "
            f"({shown})"
        )
