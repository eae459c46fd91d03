"""Label Studio-shaped payloads, as Label Studio sends them to an ML backend: the interactive
predict request with its keypoint context, the annotation webhook with a brush region, the
Start Training webhook. (The test suite has its own copies; bench code does not import tests.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.labelstudio.brush_rle import encode_brush_rle

__all__ = ["LABEL_CONFIG", "annotation_event", "keypoint", "predict_body", "task",
           "train_event"]

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="image">
    <Label value="object" background="#ff0000"/>
  </BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="object" smart="true" background="#00ff00" showInline="true"/>
  </KeyPointLabels>
</View>"""


def keypoint(x: float, y: float, positive: bool, width: int, height: int, index: int
             ) -> dict[str, Any]:
    """A smart keypoint region of an interactive context; ``x``, ``y`` in percent."""
    return {"id": f"kp{index}", "type": "keypointlabels", "from_name": "click",
            "to_name": "image", "is_positive": positive, "origin": "manual",
            "original_width": width, "original_height": height,
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["object"]}}


def task(task_id: int, project: int, url: str) -> dict[str, Any]:
    return {"id": task_id, "project": project, "data": {"image": url}, "annotations": [],
            "predictions": []}


def predict_body(task_: dict[str, Any], regions: list[dict[str, Any]], project: int
                 ) -> dict[str, Any]:
    """A /predict request of one task with the interactive context ``regions``."""
    return {"tasks": [task_], "project": f"{project}.1712345678", "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": {"result": regions}}}


def brush_region(mask: np.ndarray) -> dict[str, Any]:
    """A brushlabels region of an annotation (Label Studio's brush RLE)."""
    return {"type": "brushlabels", "from_name": "mask", "to_name": "image",
            "original_width": int(mask.shape[1]), "original_height": int(mask.shape[0]),
            "image_rotation": 0,
            "value": {"format": "rle", "rle": encode_brush_rle(mask), "brushlabels": ["object"]}}


def annotation_event(project: int, annotation: int, task_: dict[str, Any], mask: np.ndarray
                     ) -> dict[str, Any]:
    """The ANNOTATION_CREATED webhook of an annotation holding ``mask``."""
    return {"action": "ANNOTATION_CREATED",
            "annotation": {"id": annotation, "task": task_["id"], "project": project,
                           "result": [brush_region(mask)], "was_cancelled": False},
            "task": {"id": task_["id"], "project": project, "data": task_["data"]},
            "project": {"id": project, "title": f"campaign {project}",
                        "label_config": LABEL_CONFIG}}


def train_event(project: int) -> dict[str, Any]:
    """Label Studio's Start Training webhook."""
    return {"action": "START_TRAINING", "project": {"id": project, "label_config": LABEL_CONFIG}}
