"""The click protocol: deepest points are the exhaustive search's, clicks go where the
protocol says, NoC counts and caps."""

from __future__ import annotations

import pytest
import torch

from regcl.data import synthetic
from regcl.errors import ConfigError
from regcl.evaluation.clicks import deepest_point, interactive_summary, next_clicks, noc


def brute_deepest(region: torch.Tensor, exclude: torch.Tensor | None = None
                  ) -> tuple[float, int, int]:
    """Every allowed pixel against every outside pixel and the virtual border."""
    h, w = region.shape
    oy, ox = (~region).nonzero(as_tuple=True)
    ring_y = torch.cat([torch.full((w,), -1), torch.full((w,), h), torch.arange(h),
                        torch.arange(h)])
    ring_x = torch.cat([torch.arange(w), torch.arange(w), torch.full((h,), -1),
                        torch.full((h,), w)])
    oy, ox = torch.cat([oy, ring_y]).float(), torch.cat([ox, ring_x]).float()
    allowed = region if exclude is None else region & ~exclude
    fy, fx = allowed.nonzero(as_tuple=True)
    if fy.numel() == 0:
        return 0.0, -1, -1
    d2 = ((fy[:, None].float() - oy) ** 2 + (fx[:, None].float() - ox) ** 2).min(1).values
    k = int(d2.argmax())  # the first maximum: raster order
    return float(d2[k].sqrt()), int(fy[k]), int(fx[k])


def test_deepest_point_is_the_exhaustive_searchs():
    _, masks = synthetic.chunked(synthetic.source_scenes, 11, 0, 12, 48)
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for mask in masks:
        noise = torch.rand(mask.shape, generator=gen) < 0.1
        exclude = torch.rand(mask.shape, generator=gen) < 0.2
        for region in (mask, mask ^ noise, ~mask):
            for skip in (None, exclude):
                fast, slow = deepest_point(region, skip), brute_deepest(region, skip)
                assert fast[1:] == slow[1:] and fast[0] == pytest.approx(slow[0]), (fast, slow)
                checked += 1
    assert checked == 72


def test_deepest_point_by_hand():
    region = torch.zeros(9, 12, dtype=torch.bool)
    region[2:7, 1:10] = True  # a 5 x 9 bar: its middle row is 3 from the outside
    assert deepest_point(region) == (3.0, 4, 3)  # ties: the first in raster order
    full = torch.ones(5, 5, dtype=torch.bool)  # only the border is outside
    assert deepest_point(full) == (3.0, 2, 2)
    assert deepest_point(torch.zeros(4, 4, dtype=torch.bool)) == (0.0, -1, -1)
    centre = torch.zeros(5, 5, dtype=torch.bool)
    centre[2, 2] = True
    assert deepest_point(full, exclude=centre)[1:] != (2, 2)  # clicked before: not again


def test_next_clicks_follow_the_protocol():
    target = torch.zeros(3, 20, 20, dtype=torch.bool)
    target[:, 4:16, 4:16] = True
    pred = torch.zeros_like(target)
    pred[1] = target[1]
    pred[1, 4:16, 4:6] = False  # image 1: a thin miss (depth 1) ...
    pred[1, 0:20, 16:20] = True  # ... and a deeper spill (depth 2): a negative click
    pred[2] = target[2]  # image 2: perfect
    coords, labels = next_clicks(pred, target)
    assert labels.tolist() == [1, 0, -1]
    x, y = coords[0].long().tolist()  # image 0: nothing predicted, the object's centre
    assert 9 <= x <= 10 and 9 <= y <= 10 and target[0, y, x]
    x, y = coords[1].long().tolist()
    assert pred[1, y, x] and not target[1, y, x]
    assert coords[2].tolist() == [10.0, 10.0]
    with pytest.raises(ConfigError):
        next_clicks(pred[0], target[0])


def test_noc_counts_and_caps():
    curves = torch.tensor([[0.5, 0.86, 0.95], [0.9, 0.9, 0.9], [0.1, 0.2, 0.3]])
    assert noc(curves, 0.85).tolist() == [2.0, 1.0, 3.0]  # never reached: the cap
    assert noc(curves, 0.95).tolist() == [3.0, 3.0, 3.0]
    summary = interactive_summary(curves, iou_after=(1, 3, 5), thresholds=(0.85,))
    assert summary == pytest.approx({"iou@1": 0.5, "iou@3": 0.7166667, "noc@85": 2.0})
