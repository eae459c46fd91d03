"""SDPA attention (regcl.models.fast_attention) against segment-anything's own attention.

Stated tolerances, on the shipped tiny SAM and held-out source scenes (one positive point,
multimask), against the original fp32 encoder:

- fp32 + SDPA: embeddings within 1e-4 (seen: 3e-6); the masks are the same pixels (all but
  at most 0.01 %; seen: identical).
- bf16 (+ SDPA or not): embeddings within 2 % relative L2 error (seen: 0.6 %); masks agree on
  at least 99.9 % of pixels (seen: 99.98 %), every mask's IoU with the fp32 one at least 0.95
  (seen: 0.976) and predicted IoU scores within 0.01 (seen: 0.0015).
"""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from regcl.data import synthetic
from regcl.evaluation.evaluate import evaluation_prompts
from regcl.models import build_sam, predict_masks_batched, preprocess, upscale_logits
from regcl.models.fast_attention import (
    SDPAAttention,
    use_original_attention,
    use_sdpa_attention,
)
from regcl.models.serving import ServingEncoder


@pytest.fixture(scope="module")
def setup():
    sam = build_sam("tiny")
    images, masks = synthetic.chunked(synthetic.source_scenes, 99, 0, 6, 256)
    coords, labels = evaluation_prompts(masks, 0, 1)
    pixels = preprocess(sam, images)
    with torch.no_grad():
        reference = sam.image_encoder(pixels)
    return sam, pixels, coords, labels, reference


@torch.no_grad()
def _masks(sam, embeddings, coords, labels):
    low, iou = predict_masks_batched(sam, embeddings, coords, labels, multimask_output=True)
    return upscale_logits(low, sam.image_encoder.img_size) > 0, iou


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(2).sum(-1).float()
    union = (a | b).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def test_switching_attention_is_in_place_and_reversible():
    sam = build_sam("tiny")
    encoder = copy.deepcopy(sam.image_encoder)
    keys = set(encoder.state_dict())
    assert use_sdpa_attention(encoder) == len(encoder.blocks)
    assert all(type(b.attn) is SDPAAttention for b in encoder.blocks)
    assert set(encoder.state_dict()) == keys  # same parameters, same names
    assert use_sdpa_attention(encoder) == 0
    assert use_original_attention(encoder) == len(encoder.blocks)
    assert all(type(b.attn) is Attention for b in encoder.blocks)


def test_sdpa_fp32_matches_the_original(setup):
    sam, pixels, coords, labels, reference = setup
    embeddings = ServingEncoder(sam.image_encoder, sdpa=True)(pixels)
    assert (embeddings - reference).abs().max() < 1e-4
    ours, our_iou = _masks(sam, embeddings, coords, labels)
    theirs, their_iou = _masks(sam, reference, coords, labels)
    assert (ours != theirs).float().mean() <= 1e-4
    assert (our_iou - their_iou).abs().max() < 1e-4


@pytest.mark.parametrize("sdpa", [False, True], ids=["original", "sdpa"])
def test_bf16_within_tolerance(setup, sdpa):
    sam, pixels, coords, labels, reference = setup
    embeddings = ServingEncoder(sam.image_encoder, dtype=torch.bfloat16, sdpa=sdpa)(pixels)
    assert embeddings.dtype == torch.float32 and embeddings.shape == reference.shape
    assert (embeddings - reference).norm() / reference.norm() < 0.02
    ours, our_iou = _masks(sam, embeddings, coords, labels)
    theirs, their_iou = _masks(sam, reference, coords, labels)
    assert (ours == theirs).float().mean() >= 0.999
    assert _mask_iou(ours, theirs).min() >= 0.95
    assert (our_iou - their_iou).abs().max() < 0.01
