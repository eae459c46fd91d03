"""Mask decoding batched across images.

segment-anything's ``MaskDecoder.predict_masks`` takes *one* image embedding and
``repeat_interleave``s it over the prompts, so a batch of B images costs B decoder calls. Here
each prompt row carries its own image embedding, so B images with one prompt set each decode in
one call; the arithmetic is segment-anything's own, step by step (tested for equality).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam


def predict_masks_batched(
    sam: Sam,
    image_embeddings: torch.Tensor,
    point_coords: torch.Tensor | None = None,
    point_labels: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    mask_inputs: torch.Tensor | None = None,
    multimask_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one prompt set per image embedding.

    Args:
        image_embeddings: B x C x h x w, one row per prompt set (repeat an image's embedding
            yourself to give it several prompt sets).
        point_coords: B x N x 2 (x, y) in the model's input frame (pixels of the resized,
            padded image), or None.
        point_labels: B x N, 1 positive, 0 negative, -1 padding.
        boxes: B x 4 (x0, y0, x1, y1) in the input frame, or None.
        mask_inputs: B x 1 x 4h x 4w low-resolution logits from a previous pass, or None.
        multimask_output: return the 3 multimask outputs instead of the single one.
    Returns:
        low-resolution mask logits B x M x 4h x 4w and predicted IoU B x M (M = 3 or 1).
    """
    points = None if point_coords is None else (point_coords, point_labels)
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=mask_inputs)
    decoder = sam.mask_decoder
    image_pe = sam.prompt_encoder.get_dense_pe()

    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse), dim=1)

    src = image_embeddings + dense
    pos_src = image_pe.expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]

    src = src.transpose(1, 2).reshape(b, c, h, w)
    upscaled = decoder.output_upscaling(src)
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
        dim=1,
    )
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou_pred = decoder.iou_prediction_head(iou_token_out)

    mask_slice = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, mask_slice], iou_pred[:, mask_slice]


def upscale_logits(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """B x M x h x w low-res logits → B x M x size x size, as ``Sam.postprocess_masks`` does
    for an image that fills the model's square input (no padding to crop)."""
    return F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)


def preprocess(sam: Sam, images: torch.Tensor) -> torch.Tensor:
    """B x 3 x S x S float pixels in [0, 255] → normalised encoder input (``Sam.preprocess``
    without the padding, which square model-size inputs do not need)."""
    return (images - sam.pixel_mean) / sam.pixel_std
