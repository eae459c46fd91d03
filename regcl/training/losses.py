"""Segmentation losses: focal + Dice on mask logits, MSE on the predicted IoU (SAM's recipe)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three terms. Defaults are the RegCL paper's adapter recipe."""

    focal: float = 1.0
    dice: float = 10.0
    iou: float = 1.0
    focal_alpha: float = 0.8
    focal_gamma: float = 2.0


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float
               ) -> torch.Tensor:
    """Per-mask sigmoid focal loss, mean over pixels. logits, target: B x M x H x W → B x M."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return (weight * ce * (1 - p_t) ** gamma).flatten(2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-mask soft Dice loss. logits, target: B x M x H x W → B x M."""
    prob = logits.sigmoid().flatten(2)
    tgt = target.flatten(2)
    inter = (prob * tgt).sum(-1)
    return 1 - (2 * inter + eps) / (prob.sum(-1) + tgt.sum(-1) + eps)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard IoU of thresholded logits (> 0) with the target. B x M x H x W → B x M."""
    pred = (logits > 0).flatten(2)
    tgt = target.flatten(2) > 0.5
    inter = (pred & tgt).sum(-1).float()
    union = (pred | tgt).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def segmentation_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor,
                      weights: LossWeights = LossWeights()) -> tuple[torch.Tensor, dict]:
    """Loss for M candidate masks per prompt; with M > 1 only the best candidate (lowest mask
    loss) is trained, as SAM does for ambiguous prompts.

    Args:
        logits: B x M x H x W mask logits at the target's resolution.
        iou_pred: B x M predicted IoU.
        target: B x H x W bool or float.
    Returns:
        scalar loss, and floats for logging (``loss``, ``iou``).
    """
    tgt = target.float().unsqueeze(1).expand_as(logits)
    per_mask = weights.focal * focal_loss(logits, tgt, weights.focal_alpha, weights.focal_gamma)
    per_mask = per_mask + weights.dice * dice_loss(logits, tgt)
    best = per_mask.argmin(1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    with torch.no_grad():
        true_iou = mask_iou(logits, tgt)
    iou_term = F.mse_loss(iou_pred[rows, best], true_iou[rows, best])
    loss = per_mask[rows, best].mean() + weights.iou * iou_term
    return loss, {"loss": loss.item(), "iou": true_iou[rows, best].mean().item()}
