"""Admin auth and the adapter endpoints over real HTTP: refused keys, refused adapters (pickle,
wrong shapes, NaN, malformed) with nothing stored, and a valid adapter's whole life: upload,
list, describe, serve by name, download, delete."""

from __future__ import annotations

import base64
import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save, save_file

from tests.service.api_support import (
    ADMIN_KEY,
    assert_problem,
    make_adapter,
    make_image,
    png_bytes,
)

WRONG_KEY = "wrong-key-wrong-key-wrong"
BOX = [10.0, 8.0, 90.0, 70.0]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Adapter directories: valid (with and without stats) and broken ones."""
    root = tmp_path_factory.mktemp("adapters")
    valid = make_adapter(root / "valid", seed=1)
    no_stats = make_adapter(root / "no-stats", seed=2, stats=False)
    weights = load_file(str(valid / "adapter_model.safetensors"))
    first = sorted(k for k in weights if "lora_A" in k)[0]

    def variant(name: str, replace: dict[str, torch.Tensor]) -> Path:
        directory = root / name
        directory.mkdir()
        (directory / "adapter_config.json").write_bytes(
            (valid / "adapter_config.json").read_bytes())
        save_file({**weights, **replace}, str(directory / "adapter_model.safetensors"))
        return directory

    nan = weights[first].clone()
    nan[0, 0] = float("nan")
    return {
        "valid": valid,
        "no-stats": no_stats,
        "nan": variant("nan", {first: nan}),
        "wrong-shape": variant("wrong-shape", {first: torch.zeros(4, 96)}),
    }


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


ADMIN_ENDPOINTS = [
    ("POST", "/v1/adapters"),
    ("DELETE", "/v1/adapters/some-adapter"),
    ("POST", "/v1/datasets"),
    ("DELETE", "/v1/datasets/some-dataset"),
    ("POST", "/v1/jobs/train"),
    ("POST", "/v1/jobs/merge"),
    ("POST", "/v1/jobs/evaluate"),
    ("POST", "/v1/jobs/stats"),
    ("POST", "/v1/jobs/0123456789abcdef0123456789abcdef/cancel"),
    ("POST", "/v1/versions/1/activate"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ENDPOINTS)
def test_admin_endpoints_refuse_missing_and_wrong_keys(api, anon, method, path):
    for headers in ({}, {"Authorization": f"Bearer {WRONG_KEY}"}, {"X-API-Key": WRONG_KEY},
                    {"Authorization": f"Basic {ADMIN_KEY}"}):
        response = anon.request(method, path, headers=headers, json={})
        assert_problem(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert WRONG_KEY not in response.text and ADMIN_KEY not in response.text


def test_the_admin_key_works_as_bearer_or_header_and_is_never_logged(api, anon):
    by_header = anon.delete("/v1/adapters/some-adapter", headers={"X-API-Key": ADMIN_KEY})
    by_bearer = anon.delete("/v1/adapters/some-adapter",
                            headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert_problem(by_header, 404, "not-found")
    assert_problem(by_bearer, 404, "not-found")
    log = api.log_file.read_text(errors="replace")
    assert ADMIN_KEY not in log and WRONG_KEY not in log


def _stored_adapters(api) -> list[str]:
    root = Path(api.env["REGCL_ARTIFACT_URL"]) / "adapters"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


REFUSALS = {
    "pickle-bin": (dict(model_file="adapter_model.bin",
                        model_bytes=pickle.dumps({"weights": [1, 2, 3]})), 422, "unsafe-file"),
    "pickle-as-safetensors": (dict(model_bytes=pickle.dumps({"a": 1})), 422, "invalid-adapter"),
    "wrong-shape": ({}, 422, "adapter-rejected"),
    "nan": ({}, 422, "adapter-rejected"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_adapters_are_refused_and_nothing_is_stored(api, admin, adapters, case):
    kwargs, status, code = REFUSALS[case]
    directory = adapters[case] if case in adapters else adapters["valid"]
    before = _stored_adapters(api)  # artifacts of earlier tests (each test empties Redis only)
    response = upload(admin, "bad", directory, stats=False, **kwargs)
    body = assert_problem(response, status, code)
    assert body["detail"] and api.env["REGCL_DATA_DIR"] not in body["detail"]
    assert admin.get("/v1/adapters").json() == {"adapters": []}
    assert_problem(admin.get("/v1/adapters/bad"), 404, "not-found")
    assert _stored_adapters(api) == before and "bad" not in before


def test_malformed_uploads_are_refused(api, admin, adapters):
    valid = adapters["valid"]
    assert_problem(upload(admin, "Bad Name", valid), 422, "invalid-name")
    assert_problem(upload(admin, "live", valid), 422, "reserved-name")
    stats = load_file(str(valid / "regcl_stats.safetensors"))
    gram = sorted(k for k in stats if k.endswith(".gram"))[0]
    count = sorted(k for k in stats if k.endswith(".count"))[0]

    def files_with(stats: dict[str, torch.Tensor]) -> dict:
        return {
            "adapter_config": ("adapter_config.json",
                               (valid / "adapter_config.json").read_bytes()),
            "adapter_model": ("adapter_model.safetensors",
                              (valid / "adapter_model.safetensors").read_bytes()),
            "regcl_stats": ("regcl_stats.safetensors", save(stats)),
        }

    files = files_with({**stats, gram: torch.zeros(3, 3)})
    assert_problem(admin.post("/v1/adapters", data={"name": "bad"}, files=files), 422,
                   "invalid-stats")
    assert_problem(admin.post("/v1/adapters", data={"name": "bad"},
                              files=files_with({**stats, count: torch.zeros(3, 3)})), 422,
                   "invalid-stats")
    response = admin.post("/v1/adapters", data={"name": "bad", "metadata": "[1, 2]"},
                          files=files)
    assert_problem(response, 422, "invalid-argument")
    assert_problem(admin.post("/v1/adapters", data={"name": "bad"}), 422, "validation-error")
    assert admin.get("/v1/adapters").json() == {"adapters": []}
    assert "bad" not in _stored_adapters(api)


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
