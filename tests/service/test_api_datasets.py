"""Dataset uploads over real HTTP: folder-pair and COCO zips are detected, validated and
stored; list, describe, delete. Refused archives (zip slip, links, foreign file types, zip
bombs, non-zips, malformed datasets) are in the bad-input catalogue (tests/badinput)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils

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
