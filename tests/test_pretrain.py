"""Pretraining's speedups change how fast, not what is learned: the prefetched batch stream is
the direct one, bfloat16 autocast gives float32's gradients up to rounding, and a short run
with both writes a float32 checkpoint."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from regcl.data import synthetic
from regcl.models.build import build_sam
from regcl.models.decoding import predict_masks_batched, preprocess, upscale_logits
from regcl.training.losses import segmentation_loss
from regcl.training.pretrain import (
    PRETRAIN_LOSS,
    PretrainConfig,
    prefetched_batches,
    pretrain_tiny,
    prompt_batch,
    step_generator,
    training_batch,
)


def _same_batch(a: tuple, b: tuple) -> bool:
    (ia, ma, pa), (ib, mb, pb) = a, b
    return (torch.equal(ia, ib) and torch.equal(ma, mb) and pa.keys() == pb.keys()
            and all(torch.equal(pa[k], pb[k]) if torch.is_tensor(pa[k]) else pa[k] == pb[k]
                    for k in pa))


def test_prefetched_batches_are_the_direct_ones():
    config = PretrainConfig(steps=6, batch_size=2, seed=5)
    streamed = list(prefetched_batches(config, 64))
    assert len(streamed) == config.steps
    for step, batch in enumerate(streamed):
        # The stream as the loop drew it before prefetching: scenes, then prompts, one generator.
        gen = step_generator(config.seed, step)
        images, masks = synthetic.source_scenes(gen, config.batch_size, 64)
        direct = (images, masks, prompt_batch(masks, gen))
        assert _same_batch(batch, direct), f"step {step} differs"
        assert _same_batch(batch, training_batch(config, step, 64))
    assert not _same_batch(streamed[0], streamed[1])
    assert list(prefetched_batches(PretrainConfig(steps=0), 64)) == []


def _gradient(sam, images, masks, prompts, bf16: bool) -> torch.Tensor:
    sam.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        emb = sam.image_encoder(preprocess(sam, images))
        low, iou = predict_masks_batched(sam, emb, **prompts)
    loss, _ = segmentation_loss(upscale_logits(low.float(), 256), iou.float(), masks,
                                PRETRAIN_LOSS)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in sam.parameters() if p.grad is not None])


def test_bf16_autocast_gives_float32_gradients_up_to_rounding():
    sam = build_sam("tiny")
    sam.train()
    images, masks, prompts = training_batch(PretrainConfig(batch_size=4, seed=7), 0, 256)
    exact = _gradient(sam, images, masks, prompts, bf16=False)
    mixed = _gradient(sam, images, masks, prompts, bf16=True)
    assert not torch.equal(exact, mixed)  # autocast really ran in bfloat16
    cosine = torch.nn.functional.cosine_similarity(exact, mixed, dim=0)
    assert cosine > 0.99, float(cosine)
    assert abs(float(mixed.norm() / exact.norm()) - 1) < 0.05


def test_short_bf16_run_writes_a_float32_checkpoint(tmp_path):
    init = tmp_path / "init.safetensors"
    sam = build_sam("tiny")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(init))
    out = tmp_path / "out.safetensors"
    config = PretrainConfig(steps=2, batch_size=2, lr=1e-4, warmup=1, seed=9, eval_every=2,
                            eval_samples=8, autocast_bf16=True)
    summary = pretrain_tiny(config, out, init=init)
    assert summary["recipe"]["autocast_bf16"] is True
    assert summary["best"]["step"] == 2 and [h["step"] for h in summary["history"]] == [2]
    state = load_file(str(out))
    assert all(v.dtype == torch.float32 for v in state.values())
    before = sam.state_dict()
    assert any(not torch.equal(state[k], before[k]) for k in state)  # it trained
