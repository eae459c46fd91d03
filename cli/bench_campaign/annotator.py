"""A simulated annotator: clicks by the protocol of :mod:`regcl.evaluation.clicks` (each click
from the previous prediction and the ground truth), through Label Studio's predict route (every
click sends the session's keypoints so far, in order, as Label Studio does) or through
``/v1/segment`` (points only, as other SAM backends serve).

A session stops once IoU >= ``stop_iou`` after at least ``min_clicks`` clicks (NoC@85/90 and
IoU@1/3/5 are then known), else at the protocol's cap; the curve is padded to the cap with its
last IoU, so :func:`regcl.evaluation.clicks.noc` reads it as a full curve.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np
import torch

from cli.bench_campaign.payloads import keypoint, predict_body
from regcl.client import Client
from regcl.evaluation.clicks import CLICK_CAP, next_clicks
from service.labelstudio.brush_rle import decode_brush_rle

__all__ = ["ClickSession", "Segmenter", "click_session", "ls_segmenter", "v1_segmenter"]

logger = logging.getLogger(__name__)

Click = tuple[float, float, int]  # (x, y) pixel centre, label 1 / 0
Segmenter = Callable[[list[Click]], tuple[np.ndarray, str]]
"""All clicks of the session so far -> (H x W bool mask, model_version)."""


@dataclass
class ClickSession:
    curve: list[float]  # IoU after clicks 1 .. CLICK_CAP (padded with the last)
    clicks: int  # clicks made
    versions: list[str]  # model_version of each answer


def _iou(pred: np.ndarray, target: np.ndarray) -> float:
    union = np.logical_or(pred, target).sum()
    return float(np.logical_and(pred, target).sum() / union) if union else 1.0


def click_session(segment: Segmenter, target: np.ndarray, *, stop_iou: float = 0.90,
                  min_clicks: int = 5, cap: int = CLICK_CAP) -> ClickSession:
    """Click on ``target`` (H x W bool) until the stop rule; the IoU curve."""
    truth = torch.from_numpy(target.astype(bool))[None]
    pred = torch.zeros_like(truth)
    clicked = torch.zeros_like(truth)
    clicks: list[Click] = []
    curve: list[float] = []
    versions: list[str] = []
    while len(curve) < cap:
        xy, label = next_clicks(pred, truth, clicked)
        if int(label[0]) < 0:  # no error left: nothing to click, the mask stays
            curve.append(curve[-1] if curve else 1.0)
        else:
            x, y = float(xy[0, 0]), float(xy[0, 1])
            clicked[0, int(y), int(x)] = True
            clicks.append((x, y, int(label[0])))
            mask, version = segment(clicks)
            versions.append(version)
            pred = torch.from_numpy(mask.astype(bool))[None]
            curve.append(_iou(mask, target))
        if len(curve) >= min_clicks and curve[-1] >= stop_iou:
            break
    made = len(curve)
    curve += [curve[-1]] * (cap - made)
    return ClickSession(curve, made, versions)


def ls_segmenter(http: httpx.Client, project: int, task_: dict, height: int, width: int
                 ) -> Segmenter:
    """Clicks through ``POST /labelstudio/predict`` (keypoints in percent, the mask from the
    answer's brush RLE)."""

    def segment(clicks: list[Click]) -> tuple[np.ndarray, str]:
        regions = [keypoint(x * 100 / width, y * 100 / height, label == 1, width, height, i)
                   for i, (x, y, label) in enumerate(clicks)]
        answer = http.post("/labelstudio/predict", json=predict_body(task_, regions, project))
        answer.raise_for_status()
        (prediction,) = answer.json()["results"]
        mask = np.zeros((height, width), dtype=bool)
        for region in prediction["result"]:
            if region.get("type") == "brushlabels":
                mask |= decode_brush_rle(region["value"]["rle"], height, width)
        return mask, str(prediction["model_version"])

    return segment


def v1_segmenter(client: Client, image_id: str, adapter: str) -> Segmenter:
    """Clicks through ``POST /v1/segment`` with ``adapter`` (``base``, ``live``), one mask,
    points only (every click decodes all clicks so far from scratch)."""

    def segment(clicks: list[Click]) -> tuple[np.ndarray, str]:
        result = client.segment(image_id=image_id, points=[[x, y] for x, y, _ in clicks],
                                labels=[label for _, _, label in clicks], multimask=False,
                                adapter=adapter)
        return np.asarray(result.masks[0].mask, dtype=bool), result.adapter_version

    return segment
