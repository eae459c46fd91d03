"""LoRA adapters: placement, PEFT round trips both ways, statistics, validation."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from regcl.adapters import (
    AdapterConfig,
    adapter_weights,
    attach_lora,
    collect_gram_stats,
    default_blocks,
    load_adapter,
    read_adapter,
    save_adapter,
)
from regcl.adapters.lora import STATS_FILE, WEIGHTS_FILE
from regcl.errors import AdapterError, CheckpointNotFoundError, ConfigError, StatsError
from regcl.models.build import SAM_SPECS, build_sam_from_spec
from regcl.models.decoding import preprocess


def fresh_tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_sam_from_spec(SAM_SPECS["tiny"])


def randomise_lora(model: PeftModel, seed: int = 1) -> None:
    """LoRA B starts at zero (a no-op adapter); give it values so round trips mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def encoder_out(model, images):
    sam = model.base_model.model if isinstance(model, PeftModel) else model
    with torch.no_grad():
        return sam.image_encoder(preprocess(sam, images))


@pytest.fixture
def images():
    return torch.rand((2, 3, 256, 256), generator=torch.Generator().manual_seed(0)) * 255


def test_default_placement_is_the_papers():
    assert default_blocks(12) == (7, 8, 9, 10, 11)  # vit_b: blocks 7–11
    assert default_blocks(6) == (3, 4, 5)  # tiny
    assert default_blocks(32) == tuple(range(18, 32))
    with pytest.raises(ConfigError):
        AdapterConfig(rank=0)
    with pytest.raises(ConfigError):
        AdapterConfig(blocks=(9,)).resolved_blocks(6)


def test_attach_trains_only_lora():
    model = attach_lora(fresh_tiny(), AdapterConfig(rank=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    keys = set(adapter_weights(model))
    assert len(keys) == 6  # A and B in each of blocks 3, 4, 5
    assert all(".blocks.3." in k or ".blocks.4." in k or ".blocks.5." in k for k in keys)


def test_round_trip_to_plain_peft(tmp_path, images):
    model = attach_lora(fresh_tiny(), AdapterConfig(rank=4))
    randomise_lora(model)
    expected = encoder_out(model, images)
    save_adapter(model, tmp_path / "a", metadata={"domain": "polyp"})
    plain = PeftModel.from_pretrained(fresh_tiny(), str(tmp_path / "a"))
    torch.testing.assert_close(encoder_out(plain, images), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(encoder_out(fresh_tiny(), images), expected)
    meta = json.loads((tmp_path / "a" / "regcl_adapter.json").read_text())
    assert meta["domain"] == "polyp" and "created_at" in meta


def test_round_trip_from_plain_peft(tmp_path, images):
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["qkv"], layers_pattern="blocks",
                        layers_to_transform=[4, 5])
    plain = get_peft_model(fresh_tiny(), config)
    randomise_lora(plain, seed=7)
    expected = encoder_out(plain, images)
    plain.save_pretrained(str(tmp_path / "p"))
    ours, files = load_adapter(fresh_tiny(), tmp_path / "p")
    assert files.stats is None  # servable, but RegCL needs statistics computed for it
    torch.testing.assert_close(encoder_out(ours, images), expected, atol=1e-5, rtol=1e-5)


def test_gram_statistics_are_the_layer_inputs(images):
    model = attach_lora(fresh_tiny(), AdapterConfig(rank=4))
    randomise_lora(model)
    qkv = model.base_model.model.image_encoder.blocks[4].attn.qkv
    seen = []
    handle = qkv.base_layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    stats = collect_gram_stats(model, images=images)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    key = "base_model.model.image_encoder.blocks.4.attn.qkv.lora_A.weight"
    torch.testing.assert_close(stats[f"{key}.gram"].double(), x.T @ x / x.shape[0],
                               atol=1e-4, rtol=1e-4)
    assert int(stats[f"{key}.count"]) == 2 * 16 * 16
    a = qkv.lora_A["default"].weight.detach().double()
    xa = x @ a.T
    key_b = key.replace("lora_A", "lora_B")
    torch.testing.assert_close(stats[f"{key_b}.gram"].double(), xa.T @ xa / x.shape[0],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats[f"{key}.mean"].double(), x.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats[f"{key_b}.mean"].double(), xa.mean(0), atol=1e-5,
                               rtol=1e-5)


def test_statistics_without_the_mean_still_load(tmp_path, images):
    """``.mean`` came later: statistics written before it stay valid; a bad one is refused."""
    model = attach_lora(fresh_tiny(), AdapterConfig(rank=4))
    stats = collect_gram_stats(model, images=images)
    old = {k: v for k, v in stats.items() if not k.endswith(".mean")}
    assert len(old) < len(stats)
    save_adapter(model, tmp_path / "old", stats=old)
    assert set(read_adapter(tmp_path / "old").stats) == set(old)
    mean_key = next(k for k in stats if k.endswith(".mean"))
    with pytest.raises(StatsError, match="mean"):
        save_adapter(model, tmp_path / "bad", stats={**stats, mean_key: stats[mean_key][:-1]})


def test_seeded_init_is_peft_init_from_a_generator():
    """Same seed, same weights in any process state; lora_B zero; lora_A PEFT's Kaiming bound."""
    torch.manual_seed(123)
    first = adapter_weights(attach_lora(fresh_tiny(), AdapterConfig(rank=4), seed=7))
    torch.manual_seed(456)
    again = adapter_weights(attach_lora(fresh_tiny(), AdapterConfig(rank=4), seed=7))
    other = adapter_weights(attach_lora(fresh_tiny(), AdapterConfig(rank=4), seed=8))
    for key, value in first.items():
        assert torch.equal(value, again[key])
        if ".lora_B." in key:
            assert not value.any()
        else:
            bound = 1 / value.shape[1] ** 0.5  # kaiming_uniform_ with a=sqrt(5): 1/sqrt(fan_in)
            assert value.abs().max() <= bound and value.std() > bound / 3
            assert not torch.equal(value, other[key])


def test_stats_saved_and_checked(tmp_path, images):
    model = attach_lora(fresh_tiny(), AdapterConfig(rank=4))
    stats = collect_gram_stats(model, images=images)
    save_adapter(model, tmp_path / "s", stats=stats)
    files = read_adapter(tmp_path / "s")
    assert files.stats is not None and set(files.stats) == set(stats)
    with pytest.raises(AdapterError, match="never overwritten"):
        save_adapter(model, tmp_path / "s")
    broken = dict(stats)
    broken.pop(next(k for k in broken if k.endswith(".gram")))
    with pytest.raises(StatsError):
        save_adapter(model, tmp_path / "t", stats=broken)
    assert not (tmp_path / "t").exists()
    count_key = next(k for k in stats if k.endswith(".count"))
    with pytest.raises(StatsError, match="one integer"):
        save_adapter(model, tmp_path / "u", stats={**stats, count_key: torch.tensor([3, 4])})


def _saved(tmp_path, name="x"):
    model = attach_lora(fresh_tiny(), AdapterConfig(rank=4))
    return save_adapter(model, tmp_path / name)


def test_bad_adapters_raise_typed_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        read_adapter(tmp_path / "missing")
    path = _saved(tmp_path, "pickle")
    (path / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterError, match="pickle"):
        read_adapter(path)

    path = _saved(tmp_path, "nan")
    weights = load_file(str(path / WEIGHTS_FILE))
    next(iter(weights.values()))[0, 0] = float("nan")
    save_file(weights, str(path / WEIGHTS_FILE))
    with pytest.raises(AdapterError, match="non-finite"):
        load_adapter(fresh_tiny(), path)

    path = _saved(tmp_path, "shape")
    weights = load_file(str(path / WEIGHTS_FILE))
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = torch.zeros(4, 100)
    save_file(weights, str(path / WEIGHTS_FILE))
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(fresh_tiny(), path)

    path = _saved(tmp_path, "garbage")
    (path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="safetensors"):
        read_adapter(path)

    path = _saved(tmp_path, "nostats")
    (path / STATS_FILE).write_bytes(b"junk")
    with pytest.raises(AdapterError):
        read_adapter(path)
