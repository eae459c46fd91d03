"""The adapter endpoints over real HTTP: a valid adapter's whole life: upload, list, describe,
serve by name, download, delete. Refused keys and refused adapters (pickle, wrong shapes, NaN,
malformed, ...) are in the bad-input catalogue (tests/badinput)."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.service.api_support import (
    assert_problem,
    make_adapter,
    make_image,
    png_bytes,
)

BOX = [10.0, 8.0, 90.0, 70.0]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Valid adapter directories, with and without statistics."""
    root = tmp_path_factory.mktemp("adapters")
    return {"valid": make_adapter(root / "valid", seed=1),
            "no-stats": make_adapter(root / "no-stats", seed=2, stats=False)}


def upload(client, name: str, directory: Path, *, stats: bool = True,
           model_file: str = "adapter_model.safetensors", model_bytes: bytes | None = None,
           metadata: dict | None = None):
    files = {
        "adapter_config": ("adapter_config.json",
                           (directory / "adapter_config.json").read_bytes(),
                           "application/json"),
        "adapter_model": (model_file, model_bytes if model_bytes is not None else
                          (directory / "adapter_model.safetensors").read_bytes(),
                          "application/octet-stream"),
    }
    if stats and (directory / "regcl_stats.safetensors").exists():
        files["regcl_stats"] = ("regcl_stats.safetensors",
                                (directory / "regcl_stats.safetensors").read_bytes(),
                                "application/octet-stream")
    data = {"name": name, "domain": "polyp",
            "metadata": json.dumps(metadata or {"note": "test"})}
    return client.post("/v1/adapters", data=data, files=files)


def _stored_adapters(api) -> list[str]:
    root = Path(api.env["REGCL_ARTIFACT_URL"]) / "adapters"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _segment(client, image_id: str, adapter: str) -> dict:
    response = client.post("/v1/segment", json={"image_id": image_id, "box": BOX,
                                                "multimask": False, "adapter": adapter,
                                                "return_logits": True})
    assert response.status_code == 200, response.text
    assert response.headers["X-Regcl-Adapter-Version"] == response.json()["adapter_version"]
    return response.json()


def _logits(body: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(body["masks"][0]["low_res_logits"]), dtype="<f4")


def test_valid_adapter_life_cycle(api, admin, anon, adapters):
    valid = adapters["valid"]
    response = upload(admin, "polyp-a", valid, metadata={"note": "hello"})
    assert response.status_code == 201, response.text
    info = response.json()["adapter"]
    assert info["name"] == "polyp-a" and info["domain"] == "polyp"
    assert info["has_stats"] is True
    assert info["metadata"]["note"] == "hello"
    assert set(info["files"]) >= {"adapter_config.json", "adapter_model.safetensors",
                                  "regcl_stats.safetensors"}
    assert_problem(upload(admin, "polyp-a", valid), 409, "conflict")

    plain = upload(admin, "no-stats", adapters["no-stats"])
    assert plain.status_code == 201 and plain.json()["adapter"]["has_stats"] is False

    listed = anon.get("/v1/adapters").json()["adapters"]
    assert [a["name"] for a in listed] == ["no-stats", "polyp-a"]
    assert anon.get("/v1/adapters/polyp-a").json() == info

    image_id = anon.post("/v1/images", files={"file": ("x.png", png_bytes(make_image(3)),
                                                       "image/png")}).json()["image_id"]
    base = _segment(anon, image_id, "base")
    served = _segment(anon, image_id, "polyp-a")
    assert served["adapter_version"] == "domain:polyp-a"
    assert not np.allclose(_logits(base), _logits(served))

    download = anon.get("/v1/adapters/polyp-a/download")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(download.content)) as zf:
        names = set(zf.namelist())
        assert "polyp-a/adapter_model.safetensors" in names
        assert zf.read("polyp-a/adapter_model.safetensors") == \
            (valid / "adapter_model.safetensors").read_bytes()
        meta = json.loads(zf.read("polyp-a/regcl_adapter.json"))
        assert meta["domain"] == "polyp" and meta["base_model"] == "tiny"

    deleted = admin.delete("/v1/adapters/polyp-a")
    assert deleted.status_code == 200 and deleted.json() == {"name": "polyp-a",
                                                             "deleted": True}
    assert_problem(anon.get("/v1/adapters/polyp-a"), 404, "not-found")
    assert_problem(anon.get("/v1/adapters/polyp-a/download"), 404, "not-found")
    assert_problem(admin.delete("/v1/adapters/polyp-a"), 404, "not-found")
    gone = anon.post("/v1/segment", json={"image_id": image_id, "box": BOX,
                                          "adapter": "polyp-a"})
    assert_problem(gone, 404, "unknown-adapter")
    assert [a["name"] for a in anon.get("/v1/adapters").json()["adapters"]] == ["no-stats"]
    stored = _stored_adapters(api)
    assert "no-stats" in stored and "polyp-a" not in stored
