"""The serving encoder: an adapter folded into the weights equals PEFT's LoRA forward, folds
restore the base exactly, batching does not change results, a compiled encoder gives the
same embeddings and survives swaps without recompiling, and a mixed-adapter batch gives each
image its own adapter's embedding (PEFT's bit for bit; within float32 rounding of folding)."""

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
from regcl.models.lora_bank import LoraFactors, lora_factors
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


# ------------------------------------------------------------------------- mixed batches
MIXED_VS_FOLDED_ATOL = 1e-5
"""Largest |Δ| allowed between an embedding of the mixed path and of the folded one (float32;
measured 2.4e-06 on these adapters, whose update moves the embedding by up to 0.39)."""


@pytest.fixture(scope="module")
def two_adapters():
    """A PEFT model with two adapters of different ranks and placements (``default``: rank 4
    on qkv and proj of every block; ``b``: rank 2 on qkv of blocks 3-5), random factors, and
    a serving encoder copied from its base before PEFT wrapped it."""
    sam = build_sam("tiny")
    serving = ServingEncoder(sam.image_encoder)
    model = attach_lora(sam, LoraConfig(r=4, lora_alpha=8, target_modules=(
        r".*image_encoder\.blocks\.\d+\.attn\.(qkv|proj)")))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["qkv"], layers_pattern="blocks",
                                      layers_to_transform=[3, 4, 5]))
    _randomise_lora(model, 1)
    encoder = model.base_model.model.image_encoder
    serving.add_adapter("a", lora_factors(encoder, "default"))
    serving.add_adapter("b", lora_factors(encoder, "b"))
    return model, encoder, serving


def _peft(model, encoder, adapter: str | None, pixels):
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                return encoder(pixels)
        model.set_adapter(adapter)
        return encoder(pixels)


def test_a_mixed_batch_gives_each_image_peft_s_own_answer_bit_for_bit(two_adapters, pixels):
    model, encoder, serving = two_adapters
    mixed = serving(pixels, ["a", None, "b"])
    assert torch.equal(mixed[0], _peft(model, encoder, "default", pixels)[0])
    assert torch.equal(mixed[1], _peft(model, encoder, None, pixels)[1])  # base rows untouched
    assert torch.equal(mixed[2], _peft(model, encoder, "b", pixels)[2])
    assert (mixed[0] - mixed[1]).abs().max() > 1e-2  # the adapters matter
    # a run of the same adapter, and the same images in another order, agree
    assert torch.equal(serving(pixels, ["a"] * 3), _peft(model, encoder, "default", pixels))
    assert torch.equal(serving(pixels)[1], mixed[1])


def test_mixed_equals_folded_within_float32_rounding(two_adapters, pixels):
    _, _, serving = two_adapters
    for key in ("a", "b"):
        mixed = serving(pixels, [key] * 3)
        serving.fold(serving.delta_weights(key))
        try:
            folded = serving(pixels)
            with pytest.raises(ConfigError, match="folded"):
                serving(pixels, [key] * 3)  # never both at once
        finally:
            serving.fold(None)
        assert (mixed - folded).abs().max() <= MIXED_VS_FOLDED_ATOL
        assert not torch.equal(mixed, folded)  # rounded differently: two paths, really


def test_the_bank_reuses_slots_and_refuses_what_does_not_fit(two_adapters, pixels):
    _, encoder, serving = two_adapters
    factors = lora_factors(encoder, "b")
    serving.add_adapter("c", factors)
    slot = serving.bank.slot("c")
    serving.remove_adapter("c")
    assert "c" not in serving.bank
    serving.add_adapter("d", factors)  # the freed slot, zeroed and filled again
    assert serving.bank.slot("d") == slot
    assert torch.equal(serving(pixels, ["d", "b", None]), serving(pixels, ["b", "b", None]))
    serving.remove_adapter("d")
    with pytest.raises(ConfigError, match="resident already"):
        serving.add_adapter("b", factors)
    name = "blocks.3.attn.qkv"
    with pytest.raises(ConfigError, match="do not fit"):
        serving.add_adapter("bad", {name: LoraFactors(torch.ones(2, 5), torch.ones(576, 2), 1.0)})
    with pytest.raises(ConfigError, match="no linear layer"):
        serving.add_adapter("bad", {"blocks.99.attn.qkv": factors[name]})
    with pytest.raises(KeyError):
        serving(pixels, ["nope", None, None])
    assert serving.bank.first_block("b") == 3 and serving.bank.first_block("a") == 0


def test_an_encoder_that_folds_cannot_mix(pixels):
    serving = ServingEncoder(build_sam("tiny").image_encoder, mixed=False)
    model = attach_lora(build_sam("tiny"), AdapterConfig(rank=4))
    _randomise_lora(model, 3)
    serving.add_adapter("a", lora_factors(model.base_model.model.image_encoder, "default"))
    assert not serving.mixes
    with pytest.raises(ConfigError, match="cannot mix"):
        serving(pixels, ["a", None, None])
    serving.fold(serving.delta_weights("a"))
    torch.testing.assert_close(serving(pixels), _peft(model, model.base_model.model.image_encoder,
                                                      "default", pixels), atol=1e-4, rtol=1e-4)
