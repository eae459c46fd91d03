"""Synthetic target domains: determinism, splits, value ranges, and that the domains really differ
(in the ways the continual-learning benchmark relies on)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regcl.data import domains, shifts
from regcl.data.domains import (
    DOMAINS,
    LONG_ORDER,
    PAPER_ORDER,
    SHIFTED_ORDER,
    SOURCE,
    SyntheticDataset,
    domain_split,
    get_domain,
    preview_grid,
    split_seed,
)
from regcl.errors import ConfigError

SIZE = 64
ALL = ("source", *PAPER_ORDER)


@pytest.fixture(scope="module")
def train_chunks() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One full chunk (64 samples, 64 px) of every domain's train split, generated once."""
    return {name: domain_split(name, "train", 64, SIZE) for name in ALL}


def _local_contrast(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean colour inside each mask minus the mean in a thin ring around it: B x 3."""
    m = masks.unsqueeze(1).float()
    ring = F.max_pool2d(m, 9, 1, 4) - m
    inside = (images * m).sum((2, 3)) / m.sum((2, 3))
    around = (images * ring).sum((2, 3)) / ring.sum((2, 3)).clamp(min=1)
    return inside - around


def test_registry() -> None:
    assert tuple(DOMAINS) == LONG_ORDER == PAPER_ORDER + SHIFTED_ORDER
    assert "source" not in DOMAINS
    assert get_domain("source") is SOURCE
    for name, spec in DOMAINS.items():
        assert get_domain(name) is spec and spec.name == name
        assert spec.paper_counterpart and spec.description


@pytest.mark.parametrize("name", PAPER_ORDER)
def test_shapes_dtypes_ranges(name: str, train_chunks: dict) -> None:
    images, masks = train_chunks[name]
    assert images.shape == (64, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert masks.shape == (64, SIZE, SIZE) and masks.dtype == torch.bool
    assert images.min() >= 0 and images.max() <= 255
    assert torch.equal(images, images.round())
    assert images.std() > 10  # not a blank canvas
    area = masks.flatten(1).float().mean(1)
    assert area.min() > 0.003, "every image has a visible target"
    assert area.max() < 0.6
    assert 0.02 <= float(area.median()) <= 0.35


@pytest.mark.parametrize("name", ALL)
def test_deterministic_and_independent_of_read_size(name: str, train_chunks: dict) -> None:
    images, masks = train_chunks[name]  # samples 0..63, read as one count
    mid_images, mid_masks = domain_split(name, "train", 3, SIZE, start=7)
    assert torch.equal(mid_images, images[7:10]) and torch.equal(mid_masks, masks[7:10])


def test_reads_across_chunk_boundary(train_chunks: dict) -> None:
    images, masks = train_chunks["camo_pattern"]
    pair_images, pair_masks = domain_split("camo_pattern", "train", 2, SIZE, start=63)
    assert torch.equal(pair_images[0], images[63]) and torch.equal(pair_masks[0], masks[63])
    assert not torch.equal(pair_images[1], images[0])  # the next chunk is not a repeat


def test_seed_is_stable_across_processes() -> None:
    # A salted hash() would change datasets between runs; crc32 is fixed forever.
    assert split_seed("polyp", "train") == 3124804044
    assert split_seed("polyp", "train") != split_seed("polyp", "test")


@pytest.mark.parametrize("name", PAPER_ORDER)
def test_train_and_test_differ(name: str, train_chunks: dict) -> None:
    test_images, _ = domain_split(name, "test", 8, SIZE)
    train_images = train_chunks[name][0]
    # No test image equals any of the first train images.
    diffs = (test_images[:, None] - train_images[None, :8]).abs().flatten(2).mean(-1)
    assert diffs.min() > 1.0


def test_unknown_names_raise_config_error() -> None:
    with pytest.raises(ConfigError, match=r"polyp.*camo_pattern"):
        domain_split("kvasir", "train", 4)
    with pytest.raises(ValueError, match="train, test"):  # ConfigError is also a ValueError
        domain_split("polyp", "val", 4)
    with pytest.raises(ConfigError, match="source"):
        get_domain("nope")
    with pytest.raises(ConfigError):
        domain_split("polyp", "train", 0)


def test_domains_differ_in_colour(train_chunks: dict) -> None:
    means = {name: train_chunks[name][0][:32].mean((0, 2, 3)) for name in ALL}
    for i, a in enumerate(ALL):
        for b in ALL[i + 1:]:
            assert (means[a] - means[b]).norm() > 20, (a, b)


def test_domains_conflict_in_what_the_target_looks_like(train_chunks: dict) -> None:
    """Polyps are brighter than their surroundings, shadows and lesions darker, camouflaged
    objects hardly differ in colour at all, unlike the contrasting source shapes."""
    contrast = {name: _local_contrast(*train_chunks[name]) for name in ALL}
    brightness = {name: c.mean(1) for name, c in contrast.items()}
    assert (brightness["polyp"] > 0).float().mean() > 0.9
    assert (brightness["shadow"] < -10).float().mean() > 0.9
    assert (brightness["skin"] < -10).float().mean() > 0.9
    source_distance = contrast["source"].norm(dim=1).median()
    for name in ("polyp", "camo", "camo_pattern"):
        assert contrast[name].norm(dim=1).median() < 0.5 * source_distance, name


def test_synthetic_dataset_matches_split() -> None:
    data = SyntheticDataset("camo", "test", 6, size=32)
    images, masks = domain_split("camo", "test", 6, 32)
    assert len(data) == 6
    sample = data[2]
    assert sample.image.shape == (32, 32, 3) and sample.image.dtype == np.uint8
    assert sample.mask.shape == (32, 32) and sample.mask.dtype == np.bool_
    assert np.array_equal(sample.image, images[2].permute(1, 2, 0).numpy().astype(np.uint8))
    assert np.array_equal(sample.mask, masks[2].numpy())
    assert sample.name == "camo/test/2" and data[-1].name == "camo/test/5"
    assert [s.name for s in data[1:3]] == ["camo/test/1", "camo/test/2"]
    assert len(list(data)) == 6
    with pytest.raises(IndexError):
        data[6]


def test_preview_grid_draws_outlines() -> None:
    grid = preview_grid(["polyp", "shadow"], per_domain=3, size=32)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 36, 3 * 36, 3)
    red = (grid[..., 0] == 255) & (grid[..., 1] == 0) & (grid[..., 2] == 0)
    assert red[:36].any() and red[36:].any()


def test_every_generator_is_importable_by_name() -> None:
    for name in PAPER_ORDER:
        assert getattr(domains, name) is DOMAINS[name].generate


@pytest.mark.parametrize(("family", "look"), [
    ("polyp", shifts.nbi), ("camo", shifts.night), ("shadow", shifts.aerial),
    ("skin", shifts.uv), ("camo_pattern", shifts.thermal)])
def test_a_shifted_twin_is_its_family_seen_through_a_look(family: str, look) -> None:
    """Same generator seed: the twin's masks are the family's, its images the family's images
    through the look (drawn after the scene), rounded integers in [0, 255]."""
    twin = shifts.shifted(DOMAINS[family].generate, look)
    images, masks = DOMAINS[family].generate(torch.Generator().manual_seed(3), 4, SIZE)
    gen = torch.Generator().manual_seed(3)
    twin_images, twin_masks = twin(gen, 4, SIZE)
    assert torch.equal(twin_masks, masks)
    assert torch.equal(twin_images, twin_images.round())
    assert twin_images.min() >= 0 and twin_images.max() <= 255
    assert (twin_images - images).abs().mean() > 20  # a real shift, not a tweak


def test_shifted_twins_break_their_familys_cue() -> None:
    """Lesions turn bright (uv), polyps lose their redness (nbi), shadows their blue tint
    (aerial), night scenes are dark, thermal images are grey."""
    def chunk(name):
        return domain_split(name, "train", 32, SIZE)

    def redness(images, masks):
        m = masks.unsqueeze(1).float()
        inside = (images * m).sum((2, 3)) / m.sum((2, 3))
        return inside[:, 0] - inside[:, 1:].mean(1)

    assert (_local_contrast(*chunk("skin")).mean(1) < 0).float().mean() > 0.9
    assert (_local_contrast(*chunk("skin_uv")).mean(1) > 10).float().mean() > 0.9
    assert redness(*chunk("polyp")).median() > 30 > redness(*chunk("polyp_nbi")).median()
    aerial, _ = chunk("shadow_aerial")
    assert (aerial[:, 2] - aerial[:, 0]).abs().mean() < 15
    assert chunk("camo_night")[0].mean() < 0.5 * chunk("camo")[0].mean()
    thermal, _ = chunk("camo_pattern_thermal")
    assert (thermal[:, 0] - thermal[:, 1]).abs().mean() < 5  # one grey channel, noise aside
