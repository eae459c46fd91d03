"""The serving encoder: an adapter folded into the weights equals PEFT's LoRA forward, folds
restore the base exactly, batching does not change results, and a compiled encoder gives the
same embeddings and survives swaps without recompiling."""

from __future__ import annotations

import shutil
import sysconfig

import pytest
import torch
from peft import LoraConfig
from torch._dynamo.utils import counters

from regcl.adapters import AdapterConfig, attach_lora
from regcl.errors import ConfigError
from regcl.models import build_sam, preprocess
from regcl.models.serving import ServingEncoder, lora_deltas


def _randomise_lora(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def pixels():
    gen = torch.Generator().manual_seed(0)
    return preprocess(build_sam("tiny"), torch.rand(3, 3, 256, 256, generator=gen) * 255)


def test_folded_adapter_equals_peft_lora_forward(pixels):
    sam = build_sam("tiny")
    serving = ServingEncoder(sam.image_encoder)  # copied before PEFT wraps the model
    with torch.no_grad():
        base = sam.image_encoder(pixels)
    config = LoraConfig(r=4, lora_alpha=8,
                        target_modules=r".*image_encoder\.blocks\.\d+\.attn\.(qkv|proj)")
    model = attach_lora(sam, config)
    _randomise_lora(model, 1)
    with torch.no_grad():
        expected = model.base_model.model.image_encoder(pixels)
    deltas = lora_deltas(model.base_model.model.image_encoder, "default")
    assert len(deltas) == 2 * len(sam.image_encoder.blocks)
    serving.fold(deltas)
    assert serving.folded_layers == frozenset(deltas)
    folded = serving(pixels)
    assert (folded - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(folded, expected, atol=1e-4, rtol=1e-4)
    serving.fold(None)  # back to base: bit-identical (base weights are restored, not subtracted)
    assert serving.folded_layers == frozenset()
    assert torch.equal(serving(pixels), base)


def test_fold_keeps_tensors_and_rejects_bad_deltas():
    sam = build_sam("tiny")
    serving = ServingEncoder(sam.image_encoder)
    before = {k: v.data_ptr() for k, v in serving.module.state_dict().items()}
    name = "blocks.5.attn.qkv"
    serving.fold({name: torch.ones(576, 192)})
    serving.fold({"blocks.4.attn.qkv": torch.ones(576, 192)})  # 5 restored, 4 folded
    after = {k: v.data_ptr() for k, v in serving.module.state_dict().items()}
    assert before == after  # same tensors: a swap is a copy, never a new parameter
    assert torch.equal(serving.module.blocks[5].attn.qkv.weight,
                       sam.image_encoder.blocks[5].attn.qkv.weight)
    with pytest.raises(ConfigError, match="does not fit"):
        serving.fold({name: torch.ones(3, 3)})
    with pytest.raises(ConfigError, match="no linear layer"):
        serving.fold({"blocks.99.attn.qkv": torch.ones(3, 3)})


def test_dora_cannot_be_folded():
    model = attach_lora(build_sam("tiny"), LoraConfig(r=2, target_modules=["qkv"],
                                                      use_dora=True))
    with pytest.raises(ConfigError, match="DoRA"):
        lora_deltas(model.base_model.model.image_encoder, "default")


def test_batched_equals_one_by_one(pixels):
    serving = ServingEncoder(build_sam("tiny").image_encoder)
    batched = serving(pixels)
    single = torch.cat([serving(pixels[i : i + 1]) for i in range(pixels.shape[0])])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def _have_c_compiler() -> bool:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return any(shutil.which(c) for c in (compiler, "cc", "gcc", "clang"))


@pytest.mark.skipif(not _have_c_compiler(), reason="torch.compile (inductor) on the CPU needs "
                                                   "a C compiler")
def test_compiled_encoder_matches_and_survives_swaps(pixels):
    """One compile for the bucket used; folding other adapters in (swaps) and back to base
    compiles nothing more (counted by the encoder's backend and dynamo's counters)."""
    sam = build_sam("tiny")
    eager = ServingEncoder(sam.image_encoder)
    torch._dynamo.reset()
    counters.clear()
    compiled = ServingEncoder(sam.image_encoder, compile=True, buckets=(4,))
    out = compiled(pixels)  # 3 images, padded to the bucket of 4
    assert compiled.compiles == 1 and counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(out, eager(pixels), atol=1e-4, rtol=1e-4)
    model = attach_lora(build_sam("tiny"), AdapterConfig(rank=4))
    for seed in (1, 2):
        _randomise_lora(model, seed)
        deltas = lora_deltas(model.base_model.model.image_encoder, "default")
        compiled.fold(deltas)
        eager.fold(deltas)
        torch.testing.assert_close(compiled(pixels), eager(pixels), atol=1e-4, rtol=1e-4)
    compiled.fold(None)
    torch.testing.assert_close(compiled(pixels[:2]), out[:2], atol=1e-5, rtol=1e-5)
    assert compiled.compiles == 1 and counters["stats"]["unique_graphs"] == 1
