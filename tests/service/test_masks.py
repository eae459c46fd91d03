"""Mask encodings for HTTP: COCO RLE that pycocotools reads back, PNG, area and box."""

from __future__ import annotations

import io
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from regcl.data.images import decode_mask_bytes
from service.engine.masks import mask_area, mask_bbox, mask_to_png, mask_to_rle, rle_to_mask


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shaped = np.zeros((37, 53), bool)
    shaped[5:20, 10:41] = True
    shaped[30:, :3] = True
    return [shaped, rng.random((64, 48)) > 0.5, np.zeros((7, 9), bool), np.ones((1, 1), bool)]


@pytest.mark.parametrize("index", range(4))
def test_rle_round_trips_through_pycocotools(index):
    mask = _masks()[index]
    rle = json.loads(json.dumps(mask_to_rle(mask)))  # survives JSON as plain str and ints
    assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
    np.testing.assert_array_equal(rle_to_mask(rle), mask)
    assert int(mask_utils.area(rle)) == mask_area(mask) == int(mask.sum())


def test_png_round_trip_area_and_box():
    mask = _masks()[0]
    png = mask_to_png(mask)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "L" and image.size == (53, 37)
        assert set(np.unique(np.asarray(image)).tolist()) == {0, 255}
    np.testing.assert_array_equal(decode_mask_bytes(png), mask)
    rle = mask_to_rle(mask)
    assert mask_bbox(mask) == [int(v) for v in mask_utils.toBbox(rle)] == [0, 5, 41, 32]
    assert mask_bbox(np.zeros((3, 3), bool)) == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        mask_to_rle(np.zeros((2, 3, 4), bool))


def test_bbox_is_pycocotools_box_on_random_masks():
    rng = np.random.default_rng(7)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 30, 2))
        mask = rng.random((height, width)) < rng.random() * 0.3
        expected = ([int(v) for v in mask_utils.toBbox(mask_utils.encode(
            np.asfortranarray(mask.astype(np.uint8))))] if mask.any() else [0, 0, 0, 0])
        assert mask_bbox(mask) == expected, mask.astype(int)
