"""Bad adapter uploads over real HTTP (``POST /v1/adapters``): pickle-based files (refused by
name, never read), files that are not safetensors, configs that are not plain image-encoder
LoRA, wrong targets, ranks and shapes, NaN / inf / integer weights, statistics that do not fit,
absurd sizes, another base model, and names with path separators or ``..``. Each is a 4xx
problem with a stable type and leaves the store (listings, Redis, files) untouched."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from tests.service.api_support import MAX_UPLOAD_BYTES, assert_problem

CONFIG, MODEL, STATS = "adapter_config.json", "adapter_model.safetensors", \
    "regcl_stats.safetensors"


def _parts(directory: Path) -> dict[str, tuple[str, bytes]]:
    return {"adapter_config": (CONFIG, (directory / CONFIG).read_bytes()),
            "adapter_model": (MODEL, (directory / MODEL).read_bytes()),
            "regcl_stats": (STATS, (directory / STATS).read_bytes())}


def _config(directory: Path, **changes) -> bytes:
    config = json.loads((directory / CONFIG).read_text())
    config.update(changes)
    return json.dumps(config).encode()


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / MODEL))


def _first(weights: dict[str, torch.Tensor], part: str = "lora_A") -> str:
    return sorted(k for k in weights if part in k)[0]


def _with_weight(directory: Path, change) -> bytes:
    weights = _weights(directory)
    change(weights)
    return save(weights)


def _set(key_part: str, value) -> object:
    def change(weights: dict[str, torch.Tensor]) -> None:
        key = _first(weights, key_part)
        weights[key] = value(weights[key])
    return change


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, 0] = float("nan")
    return t


def _inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, -1] = float("-inf")
    return t


def _drop_one(weights: dict[str, torch.Tensor]) -> None:
    del weights[_first(weights)]


def _add_decoder_key(weights: dict[str, torch.Tensor]) -> None:
    weights["base_model.model.mask_decoder.transformer.layers.0.self_attn.q_proj.lora_A."
            "weight"] = torch.zeros(4, 32)


def _stats(directory: Path, change) -> bytes:
    stats = load_file(str(directory / STATS))
    change(stats)
    return save(stats)


def _gram_nan(stats: dict[str, torch.Tensor]) -> None:
    key = sorted(k for k in stats if k.endswith(".gram"))[0]
    stats[key] = stats[key].clone()
    stats[key][0, 0] = float("nan")


def _drop_gram(stats: dict[str, torch.Tensor]) -> None:
    del stats[sorted(k for k in stats if k.endswith(".gram"))[0]]


def _gram_shape(stats: dict[str, torch.Tensor]) -> None:
    stats[sorted(k for k in stats if k.endswith(".gram"))[0]] = torch.eye(3)


def _count_float(stats: dict[str, torch.Tensor]) -> None:
    stats[sorted(k for k in stats if k.endswith(".count"))[0]] = torch.tensor(1.5)


def _lying_header() -> bytes:
    """A safetensors header claiming a 2^40-element tensor with 8 bytes of data."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [1 << 20, 1 << 20],
                               "data_offsets": [0, 1 << 42]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 8


PICKLE = pickle.dumps({"weights": [1, 2, 3]})

# case: (part overrides: field -> (filename, bytes) or a builder of the bytes from the valid
#        adapter's directory; form overrides; status; code)
CASES = {
    "pickle-bin": ({"adapter_model": ("adapter_model.bin", PICKLE)}, {}, 422, "unsafe-file"),
    "pickle-pt": ({"adapter_model": ("adapter_model.pt", PICKLE)}, {}, 422, "unsafe-file"),
    "pickle-pth": ({"adapter_model": ("model.pth", PICKLE)}, {}, 422, "unsafe-file"),
    "pickle-pkl": ({"adapter_model": ("model.pkl", PICKLE)}, {}, 422, "unsafe-file"),
    "pickle-ckpt": ({"adapter_model": ("model.ckpt", PICKLE)}, {}, 422, "unsafe-file"),
    "pickle-stats-bin": ({"regcl_stats": ("regcl_stats.bin", PICKLE)}, {}, 422, "unsafe-file"),
    "pickle-config-pkl": ({"adapter_config": ("adapter_config.pkl", PICKLE)}, {}, 422,
                          "unsafe-file"),
    "model-not-safetensors-suffix": ({"adapter_model": ("adapter_model.npz", b"PK")}, {}, 422,
                                     "unsafe-file"),
    "pickle-named-safetensors": ({"adapter_model": (MODEL, PICKLE)}, {}, 422,
                                 "invalid-adapter"),
    "garbage-safetensors": ({"adapter_model": (MODEL, b"\0" * 100)}, {}, 422,
                            "invalid-adapter"),
    "safetensors-lying-header": ({"adapter_model": (MODEL, _lying_header())}, {}, 422,
                                 "invalid-adapter"),
    "empty-model-file": ({"adapter_model": (MODEL, b"")}, {}, 422, "invalid-adapter"),
    "config-not-json": ({"adapter_config": (CONFIG, b"{nope")}, {}, 422, "invalid-adapter"),
    "config-a-list": ({"adapter_config": (CONFIG, b"[1, 2]")}, {}, 422, "invalid-adapter"),
    "config-not-lora": ({"adapter_config": (CONFIG, lambda d: _config(d, peft_type="IA3"))},
                        {}, 422, "invalid-adapter"),
    "targets-mask-decoder": ({"adapter_config": (CONFIG, lambda d: _config(
        d, target_modules="mask_decoder.*q_proj", layers_to_transform=None,
        layers_pattern=None))}, {}, 422, "adapter-rejected"),
    "targets-nothing": ({"adapter_config": (CONFIG, lambda d: _config(
        d, target_modules=["no_such_layer"]))}, {}, 422, "adapter-rejected"),
    "targets-all-linear": ({"adapter_config": (CONFIG, lambda d: _config(
        d, target_modules="all-linear", layers_to_transform=None, layers_pattern=None))},
        {}, 422, "adapter-rejected"),
    "bias-all": ({"adapter_config": (CONFIG, lambda d: _config(d, bias="all"))}, {}, 422,
                 "adapter-rejected"),
    "modules-to-save": ({"adapter_config": (CONFIG, lambda d: _config(
        d, modules_to_save=["mask_decoder"]))}, {}, 422, "adapter-rejected"),
    "wrong-rank-in-config": ({"adapter_config": (CONFIG, lambda d: _config(d, r=8))}, {}, 422,
                             "adapter-rejected"),
    "wrong-shape": ({"adapter_model": (MODEL, lambda d: _with_weight(
        d, _set("lora_A", lambda t: torch.zeros(4, 96))))}, {}, 422, "adapter-rejected"),
    "wrong-rank-in-weights": ({"adapter_model": (MODEL, lambda d: _with_weight(
        d, _set("lora_B", lambda t: torch.zeros(t.shape[0], 2))))}, {}, 422,
        "adapter-rejected"),
    "missing-weight": ({"adapter_model": (MODEL, lambda d: _with_weight(d, _drop_one))}, {},
                       422, "adapter-rejected"),
    "weight-outside-encoder": ({"adapter_model": (MODEL, lambda d: _with_weight(
        d, _add_decoder_key))}, {}, 422, "adapter-rejected"),
    "nan-weight": ({"adapter_model": (MODEL, lambda d: _with_weight(d, _set("lora_A", _nan)))},
                   {}, 422, "adapter-rejected"),
    "inf-weight": ({"adapter_model": (MODEL, lambda d: _with_weight(d, _set("lora_B", _inf)))},
                   {}, 422, "adapter-rejected"),
    "huge-weight": ({"adapter_model": (MODEL, lambda d: _with_weight(
        d, _set("lora_B", lambda t: t * 1e10)))}, {}, 422, "adapter-rejected"),
    "integer-weight": ({"adapter_model": (MODEL, lambda d: _with_weight(
        d, _set("lora_A", lambda t: t.to(torch.int32))))}, {}, 422, "adapter-rejected"),
    "absurd-size": ({"adapter_model": (MODEL, b"\0" * (MAX_UPLOAD_BYTES + 1))}, {}, 413,
                    "payload-too-large"),
    "stats-nan": ({"regcl_stats": (STATS, lambda d: _stats(d, _gram_nan))}, {}, 422,
                  "invalid-stats"),
    "stats-missing-layer": ({"regcl_stats": (STATS, lambda d: _stats(d, _drop_gram))}, {}, 422,
                            "invalid-stats"),
    "stats-wrong-shape": ({"regcl_stats": (STATS, lambda d: _stats(d, _gram_shape))}, {}, 422,
                          "invalid-stats"),
    "stats-float-count": ({"regcl_stats": (STATS, lambda d: _stats(d, _count_float))}, {}, 422,
                          "invalid-stats"),
    "stats-pickle": ({"regcl_stats": (STATS, PICKLE)}, {}, 422, "invalid-adapter"),
    "metadata-not-object": ({}, {"metadata": "[1, 2]"}, 422, "invalid-json-field"),
    "metadata-not-json": ({}, {"metadata": "{nope"}, 422, "invalid-json-field"),
    "other-base-fingerprint": ({}, {"metadata": json.dumps({"base_fingerprint": "f" * 64})},
                               422, "base-model-mismatch"),
    "other-base-model-in-metadata": ({}, {"metadata": json.dumps({"base_model": "vit_h"})},
                                     422, "base-model-mismatch"),
    "other-base-model-in-config": ({"adapter_config": (CONFIG, lambda d: _config(
        d, base_model_name_or_path="facebook/sam-vit-huge"))}, {}, 422,
        "base-model-mismatch"),
    "name-taken": ({}, {"name": "seed-stats"}, 409, "conflict"),
    "name-reserved-live": ({}, {"name": "live"}, 422, "invalid-name"),
    "name-reserved-base": ({}, {"name": "base"}, 422, "invalid-name"),
    "domain-invalid": ({}, {"domain": "../polyp"}, 422, "invalid-name"),
}

BAD_NAMES = ["../evil", "..", ".", "a/b", "a\\b", "/abs", "x/../../etc", "Upper", "-dash",
             "name with space", "x" * 65, "é", "a\x00b", "%2e%2e", "a.b", ""]


def _upload(client, directory: Path, parts: dict, form: dict, name: str = "bad"):
    files = _parts(directory)
    if any(field == "adapter_model" and callable(part[1]) for field, part in parts.items()):
        del files["regcl_stats"]  # changed weights: the statistics would be refused first
    for field, (filename, data) in parts.items():
        files[field] = (filename, data(directory) if callable(data) else data)
    return client.post("/v1/adapters", data={"name": name, **form}, files=files)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_adapter_is_refused_and_nothing_is_stored(api, admin, store, seeded, case):
    parts, form, status, code = CASES[case]
    with store.unchanged():
        response = _upload(admin, seeded.adapter_dir, parts, form, name=case)
        body = assert_problem(response, status, code)
        assert body["detail"] and api.env["REGCL_DATA_DIR"] not in body["detail"]
        assert_problem(admin.get(f"/v1/adapters/{case}"), 404, "not-found")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_adapter_names_are_refused(admin, store, seeded, name):
    with store.unchanged():
        response = _upload(admin, seeded.adapter_dir, {}, {"name": name})
        assert_problem(response, 422, "validation-error" if name == "" else "invalid-name")


@pytest.mark.parametrize("name", ["..", "%2e%2e", "a%2Fb", "..%2F..%2Fseed-stats", "Upper",
                                  "x" * 65])
def test_bad_names_in_paths(anon, admin, store, name):
    with store.unchanged():
        for response in (anon.get(f"/v1/adapters/{name}"),
                         anon.get(f"/v1/adapters/{name}/download"),
                         admin.delete(f"/v1/adapters/{name}")):
            assert response.status_code in (404, 422), response.text
            assert response.headers["content-type"].startswith("application/problem+json")


def test_missing_parts_are_schema_errors(admin, store, seeded):
    with store.unchanged():
        parts = _parts(seeded.adapter_dir)
        for missing in ("adapter_config", "adapter_model"):
            files = {k: v for k, v in parts.items() if k != missing}
            assert_problem(admin.post("/v1/adapters", data={"name": "bad"}, files=files), 422,
                           "validation-error")
        assert_problem(admin.post("/v1/adapters", files=parts), 422, "validation-error")


def test_the_store_check_sees_a_stored_adapter(admin, store, seeded):
    """The "nothing stored changed" check is not vacuous: a valid upload trips it."""
    with pytest.raises(AssertionError), store.unchanged():
        response = _upload(admin, seeded.adapter_dir, {}, {}, name="probe")
        assert response.status_code == 201, response.text
    assert admin.delete("/v1/adapters/probe").status_code == 200


@pytest.mark.parametrize(("content", "content_type"), [
    (b'{"name": "x"}', "application/json"), (b"name=x", "application/x-www-form-urlencoded"),
    (b"x", "text/plain"), (b"x", None)])
def test_uploads_that_are_not_multipart(admin, store, content, content_type):
    headers = {"content-type": content_type} if content_type else {}
    with store.unchanged():
        for path in ("/v1/adapters", "/v1/datasets"):
            assert_problem(admin.post(path, content=content, headers=headers), 422,
                           "validation-error")
