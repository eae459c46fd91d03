"""Adapter training: determinism, learning, cancellation, progress, statistics from the cache."""

from __future__ import annotations

import pytest
import torch

from regcl.adapters import AdapterConfig, adapter_weights, attach_lora, collect_gram_stats
from regcl.errors import CancelledError, ConfigError, DataError
from regcl.models.build import SAM_SPECS, build_sam_from_spec
from regcl.training.adapter import (
    TrainConfig,
    encoder_prefix_cache,
    evaluate_prefix,
    evaluate_prefix_per_image,
    gram_stats_from_prefix,
    train_adapter,
)


def model(seed=0):
    torch.manual_seed(seed)
    return attach_lora(build_sam_from_spec(SAM_SPECS["tiny"]), AdapterConfig(rank=4))


def test_training_is_deterministic_and_reports_progress(source_batch):
    images, masks = source_batch
    config = TrainConfig(epochs=1, batch_size=4, seed=3)
    seen = []
    a = model()
    train_adapter(a, images, masks, config, progress=seen.append)
    b = model()
    train_adapter(b, images, masks, config)
    wa, wb = adapter_weights(a), adapter_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(v.abs().sum() > 0 for k, v in wa.items() if "lora_B" in k)  # it moved
    assert [s["step"] for s in seen] == [1, 2] and seen[-1]["total_steps"] == 2
    c = model()
    train_adapter(c, images, masks, TrainConfig(epochs=1, batch_size=4, seed=4))
    assert not all(torch.equal(wa[k], v) for k, v in adapter_weights(c).items())


def test_training_lowers_the_loss(source_batch):
    images, masks = source_batch
    history = train_adapter(model(), images, masks, TrainConfig(epochs=6, batch_size=8))
    assert history[-1]["loss"] < history[0]["loss"]


def test_only_lora_changes(source_batch):
    images, masks = source_batch
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items() if "lora_" not in k}
    train_adapter(m, images[:4], masks[:4], TrainConfig(epochs=1, batch_size=4))
    after = m.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_cancellation_is_cooperative(source_batch):
    images, masks = source_batch
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(CancelledError, match="step 1 of"):
        train_adapter(model(), images, masks, TrainConfig(epochs=1, batch_size=2),
                      should_stop=stop)


def test_bad_data_and_config(source_batch):
    images, masks = source_batch
    with pytest.raises(DataError, match="empty"):
        empty = masks.clone()
        empty[1] = False
        train_adapter(model(), images, empty, TrainConfig(epochs=1))
    with pytest.raises(DataError, match="images must be"):
        train_adapter(model(), images[:, :, :128], masks, TrainConfig(epochs=1))
    with pytest.raises(ConfigError):
        TrainConfig(epochs=0)


def test_cached_prefix_paths_equal_the_full_encoder(source_batch):
    images, masks = source_batch
    m = model()
    train_adapter(m, images[:4], masks[:4], TrainConfig(epochs=1, batch_size=4))
    prefix = encoder_prefix_cache(m, images)
    full = collect_gram_stats(m, images=images)
    cached = gram_stats_from_prefix(m, prefix)
    for k, v in full.items():
        torch.testing.assert_close(cached[k].double(), v.double(), atol=1e-4, rtol=1e-4)
    from regcl.evaluation.evaluate import evaluate_points

    sam = m.base_model.model
    assert evaluate_prefix(m, prefix, masks) == pytest.approx(
        evaluate_points(sam, images, masks), abs=1e-4)


def test_training_from_the_cached_prefix_alone_is_bit_identical(source_batch):
    """The benchmark trains from cached prefixes without the images: the same weights, bit for
    bit, as training from the images; per-image scores average to evaluate_prefix's."""
    images, masks = source_batch
    config = TrainConfig(epochs=1, batch_size=4, seed=2)
    slow = model()
    train_adapter(slow, images, masks, config)
    fast = model()
    prefix = encoder_prefix_cache(fast, images)
    train_adapter(fast, None, masks, config, prefix=prefix)
    ws, wf = adapter_weights(slow), adapter_weights(fast)
    assert all(torch.equal(ws[k], wf[k]) for k in ws)
    per_image = evaluate_prefix_per_image(fast, prefix, masks, seed=1)
    assert per_image["iou"].shape == (images.shape[0],)
    assert {k: float(v.mean()) for k, v in per_image.items()} == evaluate_prefix(
        fast, prefix, masks, seed=1)
    with pytest.raises(DataError, match="prefix"):
        train_adapter(fast, None, masks, config)
    with pytest.raises(DataError, match="masks must be"):
        train_adapter(fast, None, masks[:2], config, prefix=prefix)
