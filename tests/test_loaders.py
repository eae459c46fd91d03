"""Tests of the file-based datasets (folder pairs, COCO) and the image/mask readers.

Every fixture is a few-pixel image written into tmp_path by the test itself.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from regcl.data.coco import CocoDataset, _decode_rle_string
from regcl.data.folders import FolderPairDataset
from regcl.data.images import (
    binarise_mask,
    decode_image_bytes,
    decode_mask_bytes,
    read_image_rgb,
    read_mask,
)
from regcl.errors import DataError

H, W = 6, 8


def _rgb(seed: int = 0) -> np.ndarray:
    """An H x W x 3 uint8 test image."""
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _square(value: int = 255) -> np.ndarray:
    """An H x W uint8 mask with a 3 x 4 block (12 pixels) set to ``value``."""
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[1:4, 2:6] = value
    return mask


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)
    return path


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- images.py


def test_image_modes_become_rgb_uint8(tmp_path: Path) -> None:
    rgb = _rgb()
    gray = rgb[:, :, 0]
    _save(tmp_path / "gray.png", gray)
    _save(tmp_path / "rgba.png", np.dstack([rgb, np.full((H, W), 7, np.uint8)]))
    _save(tmp_path / "palette.png", rgb, mode="P")
    _save(tmp_path / "sixteen.png", gray.astype(np.uint16) * 257)  # 16-bit grayscale PNG

    assert (read_image_rgb(tmp_path / "gray.png") == np.dstack([gray] * 3)).all()
    assert (read_image_rgb(tmp_path / "rgba.png") == rgb).all()  # alpha dropped, not blended
    palette = read_image_rgb(tmp_path / "palette.png")
    assert palette.shape == (H, W, 3) and palette.dtype == np.uint8
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    assert (read_image_rgb(tmp_path / "sixteen.png") == np.dstack([gray] * 3)).all()


def test_mask_threshold_rule() -> None:
    assert binarise_mask(np.array([[0, 1]], np.uint8)).tolist() == [[False, True]]
    assert binarise_mask(np.array([[0, 100, 127, 128, 255]], np.uint8)).tolist() == [
        [False, False, False, True, True]
    ]
    assert binarise_mask(np.array([[0, 255, 40000]], np.uint16)).tolist() == [[False, False, True]]
    colour = np.zeros((H, W, 3), np.uint8)
    colour[1:4, 2:6, 0] = 200  # a red object on black
    assert decode_mask_bytes(_png_bytes(colour)).sum() == 12


def test_decode_image_bytes_round_trip_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = _rgb()
    assert (decode_image_bytes(_png_bytes(rgb)) == rgb).all()
    for bad in (b"", b"\x89PNG\r\n\x1a\n not really a png", _png_bytes(rgb)[:60]):
        with pytest.raises(DataError, match="uploaded image"):
            decode_image_bytes(bad)
    gif = io.BytesIO()
    Image.fromarray(rgb).save(gif, "GIF")
    with pytest.raises(DataError):  # a format outside the allowed list
        decode_image_bytes(gif.getvalue())
    with pytest.raises(DataError, match="exceeds max_pixels"):
        decode_image_bytes(_png_bytes(rgb), max_pixels=H * W - 1)

    # PIL's own guard: its warning (above MAX_IMAGE_PIXELS) is turned into our error ...
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W - 10)
    with pytest.raises(DataError, match="decompression bomb") as caught:
        decode_image_bytes(_png_bytes(rgb), max_pixels=H * W - 10)
    assert isinstance(caught.value.__cause__, Image.DecompressionBombWarning)
    # ... unless the caller explicitly allows more than PIL's default cap.
    assert decode_image_bytes(_png_bytes(rgb), max_pixels=H * W).shape == (H, W, 3)


def test_missing_file_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.png"):
        read_mask(tmp_path / "nope.png")


# ---------------------------------------------------------------- folders.py


def _folder_dataset(root: Path) -> Path:
    """Kvasir-like layout: jpg images, png masks, one 0/255 mask and one 0/1 mask."""
    _save(root / "images" / "a.jpg", _rgb(1))
    _save(root / "images" / "b.JPG", _rgb(2))
    _save(root / "masks" / "a.png", _square(255))
    _save(root / "masks" / "b.png", _square(1))
    (root / "images" / "README.txt").write_text("not an image")
    return root


def test_folder_pairs_jpg_with_png_masks(tmp_path: Path) -> None:
    dataset = FolderPairDataset(_folder_dataset(tmp_path))
    assert len(dataset) == 2
    samples = list(dataset)
    assert [s.name for s in samples] == ["a", "b"]
    for sample in samples:
        assert sample.image.shape == (H, W, 3) and sample.image.dtype == np.uint8
        assert sample.mask.dtype == bool
        assert (sample.mask == (_square() > 0)).all()  # 0/255 and 0/1 masks agree
    assert dataset[-1].name == "b"
    assert [s.name for s in dataset[0:1]] == ["a"]
    with pytest.raises(IndexError):
        dataset[2]


def test_folder_pairs_isic_suffix_gray_and_rgba(tmp_path: Path) -> None:
    rgb = _rgb(3)
    _save(tmp_path / "img" / "ISIC_001.png", rgb[:, :, 0])
    _save(tmp_path / "img" / "ISIC_002.png", np.dstack([rgb, np.zeros((H, W), np.uint8)]))
    _save(tmp_path / "img" / "ISIC_001_superpixels.png", rgb)  # shipped by ISIC 2017; ignored
    _save(tmp_path / "gt" / "ISIC_001_segmentation.png", _square())
    _save(tmp_path / "gt" / "ISIC_002_segmentation.png", _square())
    dataset = FolderPairDataset(tmp_path, image_dir="img", mask_dir="gt")
    assert dataset.mask_suffix == "_segmentation"
    assert [s.name for s in dataset] == ["ISIC_001", "ISIC_002"]
    assert (dataset[0].image == np.dstack([rgb[:, :, 0]] * 3)).all()
    assert (dataset[1].image == rgb).all()


def test_folder_skip_empty(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path)
    _save(root / "images" / "c.png", _rgb(4))
    _save(root / "masks" / "c.png", np.zeros((H, W), np.uint8))
    assert [s.name for s in FolderPairDataset(root)] == ["a", "b"]
    assert len(FolderPairDataset(root, skip_empty=False)) == 3


def test_folder_all_masks_empty(tmp_path: Path) -> None:
    _save(tmp_path / "images" / "a.png", _rgb())
    _save(tmp_path / "masks" / "a.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DataError, match="all 1 masks are empty"):
        FolderPairDataset(tmp_path)


def test_folder_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        FolderPairDataset(tmp_path / "nowhere")
    _save(tmp_path / "images" / "a.png", _rgb())
    with pytest.raises(DataError, match="masks"):
        FolderPairDataset(tmp_path)


def test_folder_unpaired_files(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path)
    _save(root / "images" / "lonely.png", _rgb())
    _save(root / "masks" / "orphan.png", _square())
    with pytest.raises(ValueError, match=r"1 images have no mask \(lonely.png\).*orphan.png"):
        FolderPairDataset(root)


def test_folder_size_mismatch(tmp_path: Path) -> None:
    _save(tmp_path / "images" / "a.png", _rgb())
    _save(tmp_path / "masks" / "a.png", np.full((H + 1, W), 255, np.uint8))
    dataset = FolderPairDataset(tmp_path)  # sizes need pixels, so they are checked on read
    with pytest.raises(DataError, match=r"a\.png: mask is 7 x 8"):
        dataset[0]


def test_folder_corrupt_and_oversized_files(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path)
    (root / "images" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    dataset = FolderPairDataset(root)
    with pytest.raises(DataError, match=r"a\.jpg: cannot read image"):
        dataset[0]
    with pytest.raises(DataError, match="exceeds max_pixels"):
        FolderPairDataset(root, max_pixels=H * W - 1)  # masks are read by the skip_empty scan
    (root / "masks" / "b.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"b\.png"):
        FolderPairDataset(root)


# ---------------------------------------------------------------- coco.py

CH, CW = 10, 12  # COCO image height, width


def _column_major_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of an H x W bool mask (column-major, background first)."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def _coco(tmp_path: Path, **changes: Any) -> tuple[Path, Path]:
    """Write img1.png (CH x CW) and a COCO file with a polygon, two RLEs and a crowd region."""
    root = tmp_path / "images"
    _save(root / "img1.png", np.zeros((CH, CW, 3), np.uint8))
    block = np.zeros((CH, CW), np.uint8)
    block[2:5, 3:8] = 1  # 15 pixels
    compressed = mask_utils.encode(np.asfortranarray(block))
    diagonal = np.eye(CH, CW, dtype=bool)  # 10 pixels
    document: dict[str, Any] = {
        "images": [{"id": 7, "file_name": "img1.png", "height": CH, "width": CW}],
        "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "stuff"}],
        "annotations": [
            # the square from (2, 2) to (6, 6) rasterises to 4 x 4 = 16 pixels
            {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0,
             "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]},
            {"id": 2, "image_id": 7, "category_id": 2, "iscrowd": 0,
             "segmentation": {"size": [CH, CW], "counts": compressed["counts"].decode()}},
            {"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 0,
             "segmentation": {"size": [CH, CW], "counts": _column_major_runs(diagonal)}},
            {"id": 4, "image_id": 7, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [CH, CW], "counts": _column_major_runs(~diagonal)}},
        ],
    }
    for key, value in changes.items():
        document[key] = value
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(document))
    return path, root


def test_coco_polygon_and_rle_masks(tmp_path: Path) -> None:
    dataset = CocoDataset(*_coco(tmp_path))
    assert dataset.annotation_ids == (1, 2, 3)  # the crowd region is skipped
    samples = list(dataset)
    assert [s.name for s in samples] == ["img1:1", "img1:2", "img1:3"]
    assert [int(s.mask.sum()) for s in samples] == [16, 15, 10]
    assert samples[0].mask[2:6, 2:6].all()
    assert samples[1].mask[2:5, 3:8].all()
    assert (samples[2].mask == np.eye(CH, CW, dtype=bool)).all()
    assert samples[0].image.shape == (CH, CW, 3) and samples[0].mask.shape == (CH, CW)


def test_coco_category_filter_crowd_and_min_area(tmp_path: Path) -> None:
    files = _coco(tmp_path)
    assert CocoDataset(*files, category_ids=[2]).annotation_ids == (2,)
    assert CocoDataset(*files, include_crowd=True).annotation_ids == (1, 2, 3, 4)
    assert CocoDataset(*files, min_area=11).annotation_ids == (1, 2)
    with pytest.raises(ValueError, match=r"\[5\]"):
        CocoDataset(*files, category_ids=[5])


def test_rle_string_decoder_matches_pycocotools() -> None:
    mask = np.random.default_rng(0).random((CH, CW)) > 0.5
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
    assert _decode_rle_string(encoded) == _column_major_runs(mask)


def _annotation(**fields: Any) -> dict[str, Any]:
    base = {"id": 9, "image_id": 7, "category_id": 1,
            "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]}
    return {**base, **fields}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"annotations": [_annotation(image_id=99)]}, "annotation 9: refers to image id 99"),
        ({"images": [{"id": 7, "file_name": "img1.png", "height": CH, "width": CW}] * 2},
         "image 7: duplicate image id"),
        ({"images": [{"id": 7, "file_name": "gone.png", "height": CH, "width": CW}]},
         "1 annotated images are missing.*gone.png"),
        ({"images": [{"id": 7, "file_name": "../img1.png", "height": CH, "width": CW}]},
         "must be relative"),
        ({"annotations": [_annotation(segmentation={"size": [CH, CW + 1], "counts": "0"})]},
         "annotation 9: RLE size"),
        ({"annotations": [_annotation(segmentation={"size": [CH, CW], "counts": [5, 5]})]},
         "annotation 9: RLE run lengths add up to 10"),
        ({"annotations": [_annotation(segmentation={"size": [CH, CW], "counts": "0~~"})]},
         "annotation 9: compressed RLE"),
        ({"annotations": [_annotation(segmentation=[[1, 1, 5, 5]])]}, "even number"),
        ({"annotations": [_annotation(segmentation=[[0, 0, 1e9, 0, 0, 1e9]])]}, "far outside"),
        ({"annotations": [_annotation(), _annotation()]}, "annotation 9: duplicate"),
        ({"annotations": {"not": "a list"}}, "'annotations' must be a list"),
    ],
)
def test_coco_bad_annotation_files(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        CocoDataset(*_coco(tmp_path, **changes))


def test_coco_unparseable_or_incomplete_json(tmp_path: Path) -> None:
    path, root = _coco(tmp_path)
    path.write_text('{"images": [}')
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDataset(path, root)
    path.write_text('{"images": []}')
    with pytest.raises(DataError, match="missing the 'annotations' list"):
        CocoDataset(path, root)
    with pytest.raises(DataError, match="does not exist"):
        CocoDataset(tmp_path / "absent.json", root)


def test_coco_image_file_size_mismatch(tmp_path: Path) -> None:
    path, root = _coco(tmp_path)
    _save(root / "img1.png", np.zeros((CH, CW + 2, 3), np.uint8))
    dataset = CocoDataset(path, root)  # pixels, hence the file's real size, are read lazily
    with pytest.raises(DataError, match="image id 7"):
        dataset[0]
