"""Datasets → model-sized tensors (SamPredictor's resize and padding), subsets and splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regcl.data.types import Sample, SampleDataset
from regcl.errors import DataError
from workers.prepare import (
    iter_model_input,
    load_domain,
    sample_indices,
    split_holdout,
    to_model_input,
)

MEAN = (123.675, 116.28, 103.53)


class ListDataset(SampleDataset):
    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Sample:
        return self.samples[index]


def sample(h: int, w: int, box: tuple[int, int, int, int], name: str = "s") -> Sample:
    image = np.full((h, w, 3), 200, dtype=np.uint8)
    mask = np.zeros((h, w), dtype=bool)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = True
    image[mask] = (10, 20, 30)
    return Sample(image, mask, name)


def test_resizes_the_long_side_and_pads_with_the_pixel_mean() -> None:
    data = to_model_input(ListDataset([sample(64, 32, (16, 8, 48, 24))]), [0], 128, MEAN)
    assert data.images.shape == (1, 3, 128, 128) and data.masks.shape == (1, 128, 128)
    assert torch.all(data.images[0, :, :, 64:] == torch.tensor(MEAN).view(3, 1, 1))  # padding
    assert torch.all(data.images[0, :, :, :64].sum(0) >= 60 - 1)  # resized content
    assert not data.masks[0, :, 64:].any()
    ys, xs = data.masks[0].nonzero(as_tuple=True)
    assert (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())) == (32, 95, 16, 47)
    assert torch.allclose(data.images[0, :, 60, 30], torch.tensor([10.0, 20.0, 30.0]))


def test_model_sized_images_pass_unchanged() -> None:
    s = sample(128, 128, (10, 10, 40, 50))
    data = to_model_input(ListDataset([s]), [0], 128, MEAN)
    assert torch.equal(data.images[0], torch.from_numpy(s.image).permute(2, 0, 1).float())
    assert torch.equal(data.masks[0], torch.from_numpy(s.mask))


def test_objects_that_vanish_are_dropped_and_none_left_is_an_error() -> None:
    tiny = sample(1024, 1024, (0, 0, 1, 1), "tiny")
    big = sample(1024, 1024, (0, 0, 512, 512), "big")
    data = to_model_input(ListDataset([tiny, big]), [0, 1], 64, MEAN)
    assert data.names == ("big",) and data.dropped == 1 and len(data) == 1
    with pytest.raises(DataError, match="none of the 1"):
        to_model_input(ListDataset([tiny]), [0], 64, MEAN)
    with pytest.raises(DataError):
        list(iter_model_input(ListDataset([tiny, tiny]), [0, 1], 64, MEAN, chunk=1))


def test_chunks_subsets_and_holdout() -> None:
    dataset = ListDataset([sample(32, 32, (i, i, i + 8, i + 8), f"s{i}") for i in range(10)])
    whole = load_domain(dataset, 32, MEAN)
    parts = list(iter_model_input(dataset, list(range(10)), 32, MEAN, chunk=4))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert torch.equal(torch.cat([p.images for p in parts]), whole.images)

    subset = sample_indices(10, 4, seed=3)
    assert subset == sample_indices(10, 4, seed=3) and len(set(subset)) == 4
    assert sample_indices(10, None, 0) == sample_indices(10, 50, 0) == list(range(10))

    train, held = split_holdout(whole, 0.2, seed=0)
    assert (len(train), len(held)) == (8, 2)
    assert set(train.names).isdisjoint(held.names)
    assert len(split_holdout(whole, 0.01, seed=0)[1]) == 1  # at least one held out
    with pytest.raises(DataError, match="at least 2"):
        split_holdout(whole.subset([0]), 0.5, seed=0)
