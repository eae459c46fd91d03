"""The image encoder split in two at a block index.

LoRA sits only in the last blocks of the encoder and the blocks before them stay frozen, so
their output for an image never changes during adapter training or evaluation: compute it once
(:func:`encode_prefix`) and run only the adapted tail each step (:func:`encode_suffix`).
``encode_suffix(encode_prefix(x, k), k)`` equals ``image_encoder(x)`` exactly.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import ImageEncoderViT


def encode_prefix(encoder: ImageEncoderViT, pixels: torch.Tensor, first_block: int
                  ) -> torch.Tensor:
    """Normalised pixels B x 3 x S x S → tokens B x h x w x C after blocks ``0..first_block-1``."""
    x = encoder.patch_embed(pixels)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for blk in encoder.blocks[:first_block]:
        x = blk(x)
    return x


def encode_suffix(encoder: ImageEncoderViT, tokens: torch.Tensor, first_block: int
                  ) -> torch.Tensor:
    """Tokens B x h x w x C from :func:`encode_prefix` → image embeddings B x C' x h x w."""
    x = tokens
    for blk in encoder.blocks[first_block:]:
        x = blk(x)
    return encoder.neck(x.permute(0, 3, 1, 2))
