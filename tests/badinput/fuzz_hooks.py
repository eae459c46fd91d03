"""Schemathesis hooks of the fuzz test (loaded with ``SCHEMATHESIS_HOOKS=tests.badinput.
fuzz_hooks``; the samples are files in ``$REGCL_FUZZ_SAMPLES``, see ``write_samples``).

The document states what JSON Schema can state; some of what the server checks is content
that no schema generator makes at random: an image file that decodes, an adapter whose
weights fit the served model, a dataset archive whose samples read, mask logits of the
model's size, a form field holding a JSON object, and prompts inside the image they name (its
size comes back from ``POST /v1/images``), a Label Studio labeling config and extra params
(and no interactive prompt: its task image would have to come from a Label Studio). For
cases the fuzzer generated as schema-valid, this
hook puts such content in those fields (real files, made once by the test) and the stored
image's id in ``image_id``, as the config's ``[parameters]`` put existing ids into paths;
every other field stays as generated, and schema-invalid bodies are left alone.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import schemathesis
from schemathesis.core.parameters import ParameterLocation

SAMPLES_ENV = "REGCL_FUZZ_SAMPLES"
# A Label Studio labeling config regcl serves (a BrushLabels tag on an Image)
LABEL_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" '
                'toName="image"><Label value="object"/></BrushLabels></View>')
FILES = ("image.png", "adapter_config.json", "adapter_model.safetensors",
         "regcl_stats.safetensors", "dataset.zip", "mask_input.f32")


def write_samples(directory: Path, *, image: bytes, image_id: str, adapter_dir: Path,
                  dataset_zip: bytes, image_size: tuple[int, int], mask_side: int) -> Path:
    """Write the sample files the hook reads (``image``: a stored image, ``image_id`` its id,
    ``image_size`` its H x W)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "image.png").write_bytes(image)
    for name in FILES[1:4]:
        (directory / name).write_bytes((adapter_dir / name).read_bytes())
    (directory / "dataset.zip").write_bytes(dataset_zip)
    (directory / "mask_input.f32").write_bytes(b"\0" * (4 * mask_side * mask_side))
    (directory / "image.json").write_text(json.dumps({"id": image_id,
                                                      "size": list(image_size)}))
    return directory


def _load() -> tuple[dict[str, bytes], str, tuple[int, int]] | None:
    root = os.environ.get(SAMPLES_ENV)
    if not root:
        return None
    files = {name: (Path(root) / name).read_bytes() for name in FILES}
    image = json.loads((Path(root) / "image.json").read_text())
    height, width = image["size"]
    return files, image["id"], (height, width)


_SAMPLES = _load()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _clamp(value: Any, high: int) -> Any:
    return min(value, high) if isinstance(value, int | float) else value


def _prompt_in_image(prompt: dict[str, Any], size: tuple[int, int], files: dict[str, bytes]
                     ) -> None:
    height, width = size
    points = prompt.get("points")
    if isinstance(points, list):
        prompt["points"] = [[_clamp(p[0], width), _clamp(p[1], height)]
                            if isinstance(p, list) and len(p) == 2 else p for p in points]
    box = prompt.get("box")
    if isinstance(box, list) and len(box) == 4:
        prompt["box"] = [_clamp(v, high) for v, high in zip(box, (width, height) * 2)]
    if isinstance(prompt.get("mask_input"), str):
        prompt["mask_input"] = _b64(files["mask_input.f32"])


def _fill(path: str, body: dict[str, Any], files: dict[str, bytes], image_id: str,
          size: tuple[int, int]) -> None:
    if isinstance(body.get("image_id"), str):
        body["image_id"] = image_id
    if isinstance(body.get("image_base64"), str):
        body["image_base64"] = _b64(files["image.png"])
    if path == "/v1/images" and "file" in body:
        body["file"] = files["image.png"]
    if path == "/v1/segment":
        _prompt_in_image(body, size, files)
    if path == "/v1/segment/batch" and isinstance(body.get("prompts"), list):
        for prompt in body["prompts"]:
            if isinstance(prompt, dict):
                _prompt_in_image(prompt, size, files)
    if path == "/v1/adapters":
        for part, sample in (("adapter_config", "adapter_config.json"),
                             ("adapter_model", "adapter_model.safetensors"),
                             ("regcl_stats", "regcl_stats.safetensors")):
            if part in body:
                body[part] = files[sample]
    if path == "/v1/datasets" and "file" in body:
        body["file"] = files["dataset.zip"]
    if path == "/labelstudio/predict":
        body["label_config"] = LABEL_CONFIG  # no prompt: a task image would need Label Studio
        if isinstance(body.get("params"), dict):
            body["params"]["context"] = {"result": []}
    if path == "/labelstudio/setup":
        if "schema" in body:
            body["schema"] = LABEL_CONFIG
        if "extra_params" in body:
            body["extra_params"] = {"domain": "fuzz-ls"}
    if path in ("/v1/adapters", "/v1/datasets") and "metadata" in body:
        body["metadata"] = json.dumps({"note": str(body["metadata"])[:32]})


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """Real content in the content fields of a schema-valid body (see the module's doc)."""
    if _SAMPLES is None or not isinstance(case.body, dict):
        return case
    meta = case.meta
    if meta is not None and meta.is_negative_at(ParameterLocation.BODY):
        return case
    files, image_id, size = _SAMPLES
    _fill(case.operation.path, case.body, files, image_id, size)
    return case
