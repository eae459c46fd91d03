"""Bad dataset uploads over real HTTP (``POST /v1/datasets``): zip slip in every spelling,
links, foreign and hidden files, zip bombs, duplicate entries, non-zips and empty archives,
folder datasets whose masks do not match their images, and COCO annotations with bad
references. Each is a 4xx problem with a stable type and leaves the store untouched."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from tests.service.api_support import (
    MAX_UPLOAD_BYTES,
    assert_problem,
    folder_entries,
    make_image,
    make_zip,
    png_bytes,
)


def _coco(images=None, annotations=None, files=None, raw: bytes | None = None
          ) -> dict[str, bytes]:
    """A COCO dataset (one 64 x 64 image ``a.png``, one object) with parts replaced."""
    mask = np.zeros((64, 64), dtype=np.uint8, order="F")
    mask[5:30, 5:30] = 1
    rle = mask_utils.encode(mask)
    document = {
        "images": images if images is not None else
        [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}],
        "annotations": annotations if annotations is not None else
        [{"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0,
          "segmentation": {"size": [64, 64], "counts": rle["counts"].decode()}}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    entries = {"annotations.json": raw if raw is not None else json.dumps(document).encode()}
    entries.update(files if files is not None else
                   {"images/a.png": png_bytes(make_image(30, 64, 64))})
    return entries


def _polygon(points: list[float]) -> list[dict]:
    return [{"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": [points]}]


def _folder_with(**replace: bytes) -> dict[str, bytes]:
    entries = folder_entries()
    entries.update(replace)
    return entries


def _mask(height: int, width: int) -> bytes:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[5:20, 5:20] = 255
    return png_bytes(mask)


def _duplicate_entries() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in folder_entries().items():
            zf.writestr(name, data)
        zf.writestr("images/S0.png", png_bytes(make_image(5, 64, 64)))  # s0.png differs by case
    return buffer.getvalue()


def _encrypted_flag() -> bytes:
    """A zip whose entries say they are encrypted (bit 0 of the flags, set in the local and
    central headers by hand: zipfile cannot write encrypted entries)."""
    data = bytearray(make_zip(folder_entries()))
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = data.find(signature)
        while start != -1:
            data[start + offset] |= 0x1
            start = data.find(signature, start + 4)
    return bytes(data)


def _only_directories() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(zipfile.ZipInfo("images/"), b"")
        zf.writestr(zipfile.ZipInfo("masks/"), b"")
    return buffer.getvalue()


BOMB = {"images/big.png": b"\0" * (5 * 2**20)}  # 5 MiB of zeros: ~5 KiB compressed
GOOD = folder_entries()

CASES = {
    # case: (archive bytes, status, code)
    "zip-slip": (make_zip({**GOOD, "../evil.png": b"x"}), 422, "unsafe-file"),
    "zip-slip-nested": (make_zip({**GOOD, "images/../../evil.png": b"x"}), 422, "unsafe-file"),
    # "./images/x.png" is images/x.png (inside the archive): refused as an unpaired image
    "dot-segment": (make_zip({**GOOD, "./images/x.png": b"x"}), 422, "invalid-data"),
    "absolute-path": (make_zip({**GOOD, "/tmp/evil.png": b"x"}), 422, "unsafe-file"),
    "backslash": (make_zip({**GOOD, "..\\evil.png": b"x"}), 422, "unsafe-file"),
    "drive-letter": (make_zip({**GOOD, "C:/evil.png": b"x"}), 422, "unsafe-file"),
    "dir-entry-slip": (make_zip({**GOOD, "../evil/": b""}), 422, "unsafe-file"),
    "symlink": (make_zip(GOOD, links={"images/link.png": "/etc/passwd"}), 422, "unsafe-file"),
    "script": (make_zip({**GOOD, "images/run.py": b"import os"}), 422, "unsafe-file"),
    "pickle": (make_zip({**GOOD, "weights.pkl": b"x"}), 422, "unsafe-file"),
    "hidden-file": (make_zip({**GOOD, "images/.secret.png": b"x"}), 422, "unsafe-file"),
    "zip-bomb": (make_zip({**GOOD, **BOMB}), 413, "payload-too-large"),
    "too-large-archive": (b"PK" + b"\0" * MAX_UPLOAD_BYTES, 413, "payload-too-large"),
    "encrypted": (_encrypted_flag(), 422, "invalid-archive"),
    "duplicate-entry": (_duplicate_entries(), 422, "invalid-archive"),
    "not-a-zip": (b"this is not a zip file", 422, "invalid-archive"),
    "zero-bytes": (b"", 422, "invalid-archive"),
    "empty-zip": (make_zip({}), 422, "invalid-archive"),
    "only-directories": (_only_directories(), 422, "invalid-archive"),
    "only-junk": (make_zip({"__MACOSX/._a.png": b"x", ".DS_Store": b"x"}), 422,
                  "invalid-archive"),
    "no-layout": (make_zip({"pictures/a.png": png_bytes(make_image(1, 64, 64))}), 422,
                  "invalid-data"),
    "both-layouts": (make_zip({**GOOD, "annotations.json": b"{}"}), 422, "invalid-data"),
    "unpaired-image": (make_zip({k: v for k, v in GOOD.items() if k != "masks/s1.png"}), 422,
                       "invalid-data"),
    "mask-smaller-than-image": (make_zip(_folder_with(**{"masks/s1.png": _mask(32, 32)})), 422,
                                "invalid-data"),
    "mask-transposed": (make_zip(_folder_with(**{
        "images/s2.png": png_bytes(make_image(2, 64, 80)),
        "masks/s2.png": _mask(80, 64)})), 422, "invalid-data"),
    "image-corrupt": (make_zip(_folder_with(**{"images/s0.png": b"not a png"})), 422,
                      "invalid-data"),
    "mask-corrupt": (make_zip(_folder_with(**{"masks/s0.png": b"not a png"})), 422,
                     "invalid-data"),
    "all-masks-empty": (make_zip({**{k: v for k, v in GOOD.items() if k.startswith("images/")},
                                  **{k: png_bytes(np.zeros((64, 64), np.uint8))
                                     for k in GOOD if k.startswith("masks/")}}), 422,
                        "invalid-data"),
    "coco-not-json": (make_zip(_coco(raw=b"{nope")), 422, "invalid-data"),
    "coco-not-object": (make_zip(_coco(raw=b"[1, 2]")), 422, "invalid-data"),
    "coco-images-not-list": (make_zip(_coco(raw=b'{"images": 3}')), 422, "invalid-data"),
    "coco-unknown-image-id": (make_zip(_coco(annotations=[
        {"id": 7, "image_id": 99, "category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9]]}])),
        422, "invalid-data"),
    "coco-missing-file": (make_zip(_coco(images=[
        {"id": 1, "file_name": "missing.png", "height": 64, "width": 64}])), 422,
        "invalid-data"),
    "coco-file-name-slip": (make_zip(_coco(images=[
        {"id": 1, "file_name": "../../etc/passwd", "height": 64, "width": 64}])), 422,
        "invalid-data"),
    "coco-file-name-absolute": (make_zip(_coco(images=[
        {"id": 1, "file_name": "/etc/passwd", "height": 64, "width": 64}])), 422,
        "invalid-data"),
    "coco-size-mismatch": (make_zip(_coco(images=[
        {"id": 1, "file_name": "a.png", "height": 32, "width": 32}], annotations=_polygon(
            [1, 1, 20, 1, 20, 20]))), 422, "invalid-data"),
    "coco-rle-size-mismatch": (make_zip(_coco(annotations=[
        {"id": 7, "image_id": 1, "segmentation": {"size": [10, 10], "counts": "0"}}])), 422,
        "invalid-data"),
    "coco-bad-rle-counts": (make_zip(_coco(annotations=[
        {"id": 7, "image_id": 1, "segmentation": {"size": [64, 64], "counts": "\x01\x02"}}])),
        422, "invalid-data"),
    "coco-polygon-nan": (make_zip(_coco(annotations=[
        {"id": 7, "image_id": 1, "segmentation": [[1, 1, "nan", 1, 9, 9]]}])), 422,
        "invalid-data"),
    "coco-duplicate-annotation": (make_zip(_coco(annotations=_polygon(
        [1, 1, 20, 1, 20, 20]) * 2)), 422, "invalid-data"),
    "coco-no-annotations": (make_zip(_coco(annotations=[])), 422, "invalid-data"),
    "coco-huge-declared-image": (make_zip(_coco(images=[
        {"id": 1, "file_name": "a.png", "height": 100_000, "width": 100_000}],
        annotations=_polygon([1, 1, 20, 1, 20, 20]))), 422, "invalid-data"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_dataset_is_refused_and_nothing_is_stored(api, admin, store, case):
    archive, status, code = CASES[case]
    with store.unchanged():
        response = admin.post("/v1/datasets", data={"name": case},
                              files={"file": ("data.zip", archive, "application/zip")})
        body = assert_problem(response, status, code)
        assert body["detail"] and api.env["REGCL_DATA_DIR"] not in body["detail"]
        assert_problem(admin.get(f"/v1/datasets/{case}"), 404, "not-found")


FORM_CASES = {
    # case: (form fields, filename, status, code)
    "name-taken": ({"name": "seed-data"}, "d.zip", 409, "conflict"),
    "name-slip": ({"name": "../evil"}, "d.zip", 422, "invalid-name"),
    "name-slash": ({"name": "a/b"}, "d.zip", 422, "invalid-name"),
    "name-dotdot": ({"name": ".."}, "d.zip", 422, "invalid-name"),
    "name-upper": ({"name": "Bad Name"}, "d.zip", 422, "invalid-name"),
    "name-too-long": ({"name": "x" * 65}, "d.zip", 422, "invalid-name"),
    "name-missing": ({}, "d.zip", 422, "validation-error"),
    "tar-filename": ({"name": "ok"}, "data.tar", 422, "invalid-archive"),
    "metadata-not-object": ({"name": "ok", "metadata": "[1]"}, "d.zip", 422,
                            "invalid-json-field"),
    "metadata-not-json": ({"name": "ok", "metadata": "{"}, "d.zip", 422, "invalid-json-field"),
}


@pytest.mark.parametrize("case", sorted(FORM_CASES))
def test_bad_dataset_form_is_refused(admin, store, case):
    form, filename, status, code = FORM_CASES[case]
    with store.unchanged():
        response = admin.post("/v1/datasets", data=form,
                              files={"file": (filename, make_zip(GOOD), "application/zip")})
        assert_problem(response, status, code)


def test_missing_file_part(admin, store):
    with store.unchanged():
        assert_problem(admin.post("/v1/datasets", data={"name": "ok"}), 422, "validation-error")
