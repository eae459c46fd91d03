"""Per-mask metrics and the continual-learning summaries, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from regcl.evaluation.metrics import (
    average_accuracy,
    forgetting,
    forward_transfer,
    mask_metrics,
)


def test_mask_metrics_hand_computed():
    target = torch.zeros(1, 2, 4, dtype=torch.bool)
    target[0, 0, :2] = True  # 2 pixels
    prob = torch.zeros(1, 2, 4)
    prob[0, 0, 1:3] = 0.9  # predicts pixels 1, 2: 1 overlap, union 3
    m = mask_metrics(prob, target)
    assert m["iou"].item() == pytest.approx(1 / 3)
    assert m["dice"].item() == pytest.approx(2 * 1 / 4)
    # |0-1| + |0.9-1| + |0.9-0| over 8 pixels
    assert m["mae"].item() == pytest.approx((1 + 0.1 + 0.9) / 8)


def test_empty_prediction_of_empty_target_scores_one():
    m = mask_metrics(torch.zeros(1, 3, 3), torch.zeros(1, 3, 3, dtype=torch.bool))
    assert m["iou"].item() == 1.0 and m["dice"].item() == 1.0 and m["mae"].item() == 0.0


def test_continual_summaries_hand_computed():
    # rows: after step i; columns: domain j (in learning order)
    matrix = [[0.8, 0.3, 0.2],
              [0.6, 0.9, 0.4],
              [0.5, 0.7, 0.7]]
    assert average_accuracy(matrix) == pytest.approx((0.5 + 0.7 + 0.7) / 3)
    assert forgetting(matrix) == pytest.approx(((0.8 - 0.5) + (0.9 - 0.7)) / 2)
    assert forward_transfer(matrix) == pytest.approx((0.3 + 0.4) / 2)
    assert forgetting([[0.5]]) == 0.0 and forward_transfer([[0.5]]) == 0.0
