"""Dataset uploads over real HTTP: folder-pair and COCO zips are detected, validated and
stored; zip slip, links, foreign file types, zip bombs, non-zips and malformed datasets are
refused with problem+json and nothing stored; list, describe, delete."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from tests.service.api_support import (
    assert_problem,
    folder_entries,
    make_image,
    make_zip,
    png_bytes,
)


def coco_entries() -> dict[str, bytes]:
    mask = np.zeros((64, 64), dtype=np.uint8, order="F")
    mask[5:30, 5:30] = 1
    rle = mask_utils.encode(mask)
    annotations = {
        "images": [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0,
                         "segmentation": {"size": [64, 64],
                                          "counts": rle["counts"].decode()}}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    return {"annotations.json": json.dumps(annotations).encode(),
            "images/a.png": png_bytes(make_image(30, 64, 64))}


def upload(client, name: str, archive: bytes, filename: str = "data.zip", **data: str):
    return client.post("/v1/datasets", data={"name": name, **data},
                       files={"file": (filename, archive, "application/zip")})


def _stored(api) -> list[str]:
    root = Path(api.env["REGCL_ARTIFACT_URL"]) / "datasets"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_folder_and_coco_datasets_round_trip(api, admin, anon):
    response = upload(admin, "polyps", make_zip(folder_entries("kvasir/")),
                      metadata=json.dumps({"source": "synthetic"}))
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["format"], body["count"]) == ("polyps", "folders", 3)
    assert body["dataset"]["metadata"] == {"source": "synthetic"}

    coco = upload(admin, "things", make_zip(coco_entries()))
    assert coco.status_code == 201, coco.text
    assert (coco.json()["format"], coco.json()["count"]) == ("coco", 1)

    assert_problem(upload(admin, "polyps", make_zip(folder_entries())), 409, "conflict")
    listed = anon.get("/v1/datasets").json()["datasets"]
    assert [d["name"] for d in listed] == ["polyps", "things"]
    assert anon.get("/v1/datasets/polyps").json() == body["dataset"]
    assert {"polyps", "things"} <= set(_stored(api))

    assert admin.delete("/v1/datasets/polyps").json() == {"name": "polyps", "deleted": True}
    assert_problem(anon.get("/v1/datasets/polyps"), 404, "not-found")
    assert_problem(admin.delete("/v1/datasets/polyps"), 404, "not-found")
    assert "polyps" not in _stored(api) and "things" in _stored(api)


BOMB = {"images/big.png": b"\0" * (5 * 2**20)}  # 5 MiB of zeros: ~5 KiB compressed

REFUSALS = {
    "zip-slip": (make_zip({**folder_entries(), "../evil.png": b"x"}), 422, "unsafe-file"),
    "zip-slip-nested": (make_zip({**folder_entries(), "images/../../evil.png": b"x"}), 422,
                        "unsafe-file"),
    "absolute": (make_zip({**folder_entries(), "/tmp/evil.png": b"x"}), 422, "unsafe-file"),
    "backslash": (make_zip({**folder_entries(), "..\\evil.png": b"x"}), 422, "unsafe-file"),
    "symlink": (make_zip(folder_entries(), links={"images/link.png": "/etc/passwd"}), 422,
                "unsafe-file"),
    "script": (make_zip({**folder_entries(), "images/run.py": b"import os"}), 422,
               "unsafe-file"),
    "bomb": (make_zip({**folder_entries(), **BOMB}), 413, "payload-too-large"),
    "not-a-zip": (b"this is not a zip file", 422, "invalid-archive"),
    "empty": (make_zip({}), 422, "invalid-archive"),
    "no-layout": (make_zip({"pictures/a.png": png_bytes(make_image(1, 64, 64))}), 422,
                  "invalid-data"),
    "unpaired": (make_zip({k: v for k, v in folder_entries().items()
                           if k != "masks/s1.png"}), 422, "invalid-data"),
    "bad-coco": (make_zip({"annotations.json": b"{\"images\": 3}",
                           "images/a.png": png_bytes(make_image(2, 64, 64))}), 422,
                 "invalid-data"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_archives_are_refused_and_nothing_is_stored(api, admin, case):
    archive, status, code = REFUSALS[case]
    before = _stored(api)  # the artifacts of earlier tests (each test empties Redis only)
    body = assert_problem(upload(admin, "bad", archive), status, code)
    assert body["detail"] and api.env["REGCL_DATA_DIR"] not in body["detail"]
    assert admin.get("/v1/datasets").json() == {"datasets": []}
    assert _stored(api) == before and "bad" not in before


def test_bad_names_and_files(admin, anon):
    assert_problem(upload(admin, "Bad Name", make_zip(folder_entries())), 422, "invalid-name")
    assert_problem(upload(admin, "ok", make_zip(folder_entries()), filename="data.tar"), 422,
                   "invalid-archive")
    assert_problem(upload(anon, "ok", make_zip(folder_entries())), 401, "unauthorized")
