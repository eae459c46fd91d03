"""Helpers of the Label Studio tests: label-studio-sdk run in Label Studio's own virtual
environment (``.venv-labelstudio``, made by ``make labelstudio``; it must not share our venv),
and Label Studio-shaped payloads."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("REGCL_LABEL_STUDIO_VENV", REPO / ".venv-labelstudio"))
LS_PYTHON = LS_VENV / "bin" / "python"
LS_BIN = LS_VENV / "bin" / "label-studio"

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="image">
    <Label value="object" background="#ff0000"/>
  </BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="object" smart="true" background="#00ff00" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="object" background="#0000ff" showInline="true"/>
  </RectangleLabels>
</View>"""

# Encode masks with the SDK (mask2rle of mask * 255) or decode RLEs with it (alpha channel),
# as Label Studio's own tooling does; JSON in on stdin, JSON out on stdout.
_SDK_SCRIPT = """
import json, sys
import numpy as np
from label_studio_sdk.converter import brush
job = json.load(sys.stdin)
out = []
if job["op"] == "encode":
    for item in job["items"]:
        mask = np.array(item["mask"], dtype=np.uint8).reshape(item["height"], item["width"])
        out.append([int(b) for b in brush.mask2rle(mask * 255)])
else:
    for item in job["items"]:
        flat = brush.decode_rle(item["rle"])
        alpha = np.reshape(flat, [item["height"], item["width"], 4])[:, :, 3]
        out.append((alpha >= 128).astype(int).ravel().tolist())
json.dump(out, sys.stdout)
"""


def ls_python() -> Path:
    """The Label Studio venv's python (the test fails, naming the fix, if it is missing)."""
    if not LS_PYTHON.exists():
        pytest.fail(f"{LS_PYTHON} is missing: `make labelstudio` creates Label Studio's own "
                    "venv (make test does it first)")
    return LS_PYTHON


def sdk(op: str, items: list[dict[str, Any]]) -> list[Any]:
    """Run label-studio-sdk's brush converter on ``items`` in Label Studio's venv."""
    done = subprocess.run([str(ls_python()), "-c", _SDK_SCRIPT], input=json.dumps(
        {"op": op, "items": items}), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def sdk_encode(masks: list[np.ndarray]) -> list[list[int]]:
    """``brush.mask2rle(mask * 255)`` of each H x W bool mask."""
    return sdk("encode", [{"mask": m.astype(int).ravel().tolist(), "height": m.shape[0],
                           "width": m.shape[1]} for m in masks])


def sdk_decode(rles: list[list[int]], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """The H x W bool masks (alpha >= 128) of ``rles`` decoded by ``brush.decode_rle``;
    ``sizes``: (height, width) of each."""
    flat = sdk("decode", [{"rle": r, "height": h, "width": w}
                          for r, (h, w) in zip(rles, sizes, strict=True)])
    return [np.array(f, dtype=bool).reshape(h, w) for f, (h, w) in zip(flat, sizes,
                                                                       strict=True)]


# -- Label Studio-shaped payloads --------------------------------------------------------------


def keypoint(x: float, y: float, positive: bool = True, label: str = "object") -> dict:
    """A smart keypoint region of an interactive context (percent coordinates)."""
    return {"type": "keypointlabels", "from_name": "click", "to_name": "image",
            "is_positive": positive, "origin": "manual",
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]}}


def rectangle(x: float, y: float, width: float, height: float) -> dict:
    """A smart rectangle region (percent coordinates)."""
    return {"type": "rectanglelabels", "from_name": "box", "to_name": "image",
            "value": {"x": x, "y": y, "width": width, "height": height, "rotation": 0,
                      "rectanglelabels": ["object"]}}


def task(task_id: int, url: str) -> dict:
    return {"id": task_id, "data": {"image": url}, "annotations": [], "predictions": []}


def predict_body(tasks: list[dict], regions: list[dict] | None, project: int = 1,
                 config: str = LABEL_CONFIG) -> dict:
    """A /predict request as Label Studio sends it (``regions``: the interactive context)."""
    context = None if regions is None else {"result": regions}
    return {"tasks": tasks, "project": f"{project}.1712345678", "label_config": config,
            "params": {"login": None, "password": None, "context": context}}


def brush_region(mask: np.ndarray, rle: list[int] | None = None) -> dict:
    """A brushlabels region of an annotation (our encoder unless ``rle`` is given)."""
    from service.labelstudio.brush_rle import encode_brush_rle

    return {"type": "brushlabels", "from_name": "mask", "to_name": "image",
            "original_width": int(mask.shape[1]), "original_height": int(mask.shape[0]),
            "image_rotation": 0,
            "value": {"format": "rle", "rle": encode_brush_rle(mask) if rle is None else rle,
                      "brushlabels": ["object"]}}


def annotation_event(action: str, project: int, annotation: int, task_id: int, url: str,
                     regions: list[dict], config: str = LABEL_CONFIG) -> dict:
    """An ANNOTATION_CREATED / _UPDATED webhook as Label Studio sends it."""
    return {"action": action,
            "annotation": {"id": annotation, "task": task_id, "project": project,
                           "result": regions, "was_cancelled": False},
            "task": {"id": task_id, "project": project, "data": {"image": url}},
            "project": {"id": project, "title": f"project {project}", "label_config": config}}


def project_event(action: str, project: int, **payload: Any) -> dict:
    return {"action": action, "project": {"id": project, "label_config": LABEL_CONFIG},
            **payload}
