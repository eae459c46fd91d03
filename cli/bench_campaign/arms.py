"""The three arms scored on a domain's held-out tasks, and the data of a domain's project.

- ``base``: ``POST /v1/segment`` with ``adapter=base``, points only: static base SAM, what
  other SAM backends give;
- ``live``: ``POST /v1/segment`` with ``adapter=live``, points only: the live merge;
- ``project``: ``POST /labelstudio/predict`` for the domain's project: per-project serving
  (its own adapter once a step earned it, else auto, else live), as an annotator meets it.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image

from cli.bench_campaign.annotator import click_session, ls_segmenter, v1_segmenter
from cli.bench_campaign.config import CampaignConfig
from cli.bench_campaign.origin import ImageOrigin
from cli.bench_campaign.payloads import task
from regcl.client import Client
from regcl.data.domains import domain_split
from regcl.evaluation.clicks import interactive_summary

__all__ = ["ARMS", "DomainData", "domain_data", "score_arm"]

ARMS = ("base", "live", "project")
HELDOUT_TASK_BASE = 1_000_000


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class DomainData:
    """A domain's project: its stream of tasks (to label) and held-out tasks (to score), each
    with its image (H x W x 3 uint8) and ground truth (H x W bool)."""

    domain: str
    project: int
    stream: list[dict] = field(default_factory=list)
    stream_truth: list[np.ndarray] = field(default_factory=list)
    heldout: list[dict] = field(default_factory=list)
    heldout_truth: list[np.ndarray] = field(default_factory=list)
    heldout_ids: list[str] = field(default_factory=list)  # /v1/images ids (v1 arms)


def domain_data(domain: str, project: int, seed: int, config: CampaignConfig,
                origin: ImageOrigin, client: Client) -> DomainData:
    """Serve the project's images at the origin (``/data/upload/<project>/<n>.png``) and
    upload the held-out ones to the API (for the ``/v1/segment`` arms). Each seed takes its
    own slice of the domain's train and test splits."""
    data = DomainData(domain, project)
    for split, count, out, truth, offset in (
            ("train", config.tasks, data.stream, data.stream_truth, 0),
            ("test", config.heldout, data.heldout, data.heldout_truth, HELDOUT_TASK_BASE)):
        images, masks = domain_split(domain, split, count, start=seed * count)
        for i in range(count):
            pixels = images[i].permute(1, 2, 0).to(dtype=images.dtype).numpy().astype(np.uint8)
            png = _png(pixels)
            path = origin.add(f"/data/upload/{project}/{split}-{i}.png", png)
            out.append(task(offset + project * 1000 + i, project, path))
            truth.append(masks[i].numpy().astype(bool))
            if split == "test":
                data.heldout_ids.append(client.upload_image(png).image_id)
    return data


def score_arm(arm: str, data: DomainData, config: CampaignConfig, http: httpx.Client,
              client: Client) -> dict:
    """The arm's click sessions on the domain's held-out tasks: NoC@80/85/90, IoU@1/3/5 (means
    over tasks), clicks made, the versions that answered, seconds taken."""
    started = time.monotonic()
    curves, versions, clicks = [], set(), 0
    for j, (task_, truth) in enumerate(zip(data.heldout, data.heldout_truth, strict=True)):
        height, width = truth.shape
        segment = (ls_segmenter(http, data.project, task_, height, width) if arm == "project"
                   else v1_segmenter(client, data.heldout_ids[j], arm))
        session = click_session(segment, truth, stop_iou=config.stop_iou,
                                min_clicks=config.min_clicks)
        curves.append(session.curve)
        versions.update(session.versions)
        clicks += session.clicks
    import torch

    summary = interactive_summary(torch.tensor(curves), iou_after=(1, 3, 5))
    return {**summary, "clicks": clicks, "versions": sorted(versions),
            "seconds": time.monotonic() - started}
