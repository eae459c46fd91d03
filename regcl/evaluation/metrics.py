"""Per-mask metrics (IoU, Dice, MAE) and continual-learning summaries (AA, FM, FT)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mask_metrics(prob: torch.Tensor, target: torch.Tensor, threshold: float = 0.5
                 ) -> dict[str, torch.Tensor]:
    """IoU, Dice and MAE of predicted masks.

    Args:
        prob: B x H x W predicted foreground probability in [0, 1].
        target: B x H x W bool.
    Returns:
        ``iou``, ``dice``, ``mae``: B each. IoU and Dice use ``prob > threshold``; MAE is the
        mean absolute error of the probability map (as in camouflage/shadow benchmarks). An
        empty prediction of an empty target scores 1.
    """
    pred = (prob > threshold).flatten(1)
    tgt = target.flatten(1).bool()
    inter = (pred & tgt).sum(1).float()
    union = (pred | tgt).sum(1).float()
    total = pred.sum(1).float() + tgt.sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(inter))
    mae = (prob.flatten(1) - tgt.float()).abs().mean(1)
    return {"iou": iou, "dice": dice, "mae": mae}


def average_accuracy(matrix: Sequence[Sequence[float]]) -> float:
    """AA: mean score over all domains after the last step. ``matrix[i][j]`` is the score on
    domain j of the model after learning step i (domains indexed in learning order)."""
    last = matrix[-1]
    return sum(last) / len(last)


def forgetting(matrix: Sequence[Sequence[float]]) -> float:
    """FM: mean over all but the last domain of (score right after learning it − final score)."""
    n = len(matrix)
    if n < 2:
        return 0.0
    drops = [matrix[j][j] - matrix[-1][j] for j in range(n - 1)]
    return sum(drops) / len(drops)


def forward_transfer(matrix: Sequence[Sequence[float]]) -> float:
    """FT: mean over domains 2..n of the score on domain j of the model after step j−1, i.e.
    before training on it (zero-shot transfer of what was learnt so far)."""
    n = len(matrix)
    if n < 2:
        return 0.0
    scores = [matrix[j - 1][j] for j in range(1, n)]
    return sum(scores) / len(scores)
