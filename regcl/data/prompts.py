"""Prompt sampling from ground-truth masks, vectorised over a batch.

Coordinates are (x, y) pixels in the mask's frame, as segment-anything expects.
"""

from __future__ import annotations

import torch


def sample_points(masks: torch.Tensor, count: int, gen: torch.Generator,
                  positive: bool = True) -> torch.Tensor:
    """``count`` random pixels inside (or, with ``positive=False``, outside) each mask.

    Args:
        masks: B x H x W bool.
    Returns:
        B x count x 2 float (x, y) pixel centres. A mask with no eligible pixel gets the
        image centre (callers filter empty masks; this keeps shapes static).
    """
    b, h, w = masks.shape
    weights = (masks if positive else ~masks).reshape(b, -1).float()
    empty = weights.sum(1) == 0
    weights[empty] = 1.0
    index = torch.multinomial(weights, count, replacement=True, generator=gen)
    xy = torch.stack([index % w, index // w], dim=-1).float() + 0.5
    xy[empty] = torch.tensor([w / 2, h / 2])
    return xy


def mask_boxes(masks: torch.Tensor, gen: torch.Generator | None = None,
               jitter: float = 0.0) -> torch.Tensor:
    """Tight boxes of B x H x W masks as B x 4 (x0, y0, x1, y1), optionally jittered by up to
    ``jitter`` x the box side on each edge (SAM's training noise)."""
    b, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    big = torch.tensor(10**9)
    y0 = torch.where(rows, ar_h, big).min(1).values
    y1 = torch.where(rows, ar_h, -big).max(1).values + 1
    x0 = torch.where(cols, ar_w, big).min(1).values
    x1 = torch.where(cols, ar_w, -big).max(1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    empty = ~masks.reshape(b, -1).any(1)
    boxes[empty] = torch.tensor([0.0, 0.0, float(w), float(h)])
    if jitter > 0 and gen is not None:
        side = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, 1)
        noise = (torch.rand(boxes.shape, generator=gen) * 2 - 1) * jitter * side
        boxes = boxes + noise
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return boxes
