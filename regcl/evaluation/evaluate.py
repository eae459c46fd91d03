"""Scoring a SAM (with or without an adapter) on a set of images with point prompts."""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam

from regcl.data.prompts import sample_points
from regcl.evaluation.metrics import mask_metrics
from regcl.models.decoding import predict_masks_batched, preprocess, upscale_logits


@torch.no_grad()
def predict_with_points(sam: Sam, images: torch.Tensor, point_coords: torch.Tensor,
                        point_labels: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Foreground probabilities for one prompt set per image (single-mask output).

    Args:
        images: N x 3 x S x S float in [0, 255], S the model's input size.
        point_coords: N x P x 2 (x, y); point_labels: N x P.
    Returns:
        N x S x S probabilities.
    """
    was_training = sam.training
    sam.eval()
    size = sam.image_encoder.img_size
    out = []
    for i in range(0, images.shape[0], batch_size):
        emb = sam.image_encoder(preprocess(sam, images[i : i + batch_size]))
        low, _ = predict_masks_batched(
            sam, emb, point_coords[i : i + batch_size], point_labels[i : i + batch_size]
        )
        out.append(upscale_logits(low, size)[:, 0].sigmoid())
    sam.train(was_training)
    return torch.cat(out)


def evaluation_prompts(masks: torch.Tensor, seed: int, n_points: int = 3
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation protocol's prompts: ``n_points`` random positive points inside each mask,
    fixed by ``seed`` so every model is scored on the same prompts. Returns N x P x 2, N x P."""
    gen = torch.Generator().manual_seed(seed)
    coords = sample_points(masks, n_points, gen)
    return coords, torch.ones(coords.shape[:2], dtype=torch.int64)


def evaluate_points(sam: Sam, images: torch.Tensor, masks: torch.Tensor, seed: int = 0,
                    n_points: int = 3, batch_size: int = 32) -> dict[str, float]:
    """Mean IoU, Dice and MAE with ``n_points`` positive points per object.

    Runs on the model's device wherever ``images`` and ``masks`` (N x S x S bool) live: the
    prompts are drawn on the CPU (so a seed gives the same prompts on every device) and moved,
    and the metrics are computed batch by batch on the device; only the means come back.
    """
    device = sam.device
    coords, labels = evaluation_prompts(masks.cpu(), seed, n_points)
    scores: dict[str, list[torch.Tensor]] = {"iou": [], "dice": [], "mae": []}
    for i in range(0, images.shape[0], batch_size):
        part = slice(i, i + batch_size)
        prob = predict_with_points(sam, images[part].to(device), coords[part].to(device),
                                   labels[part].to(device), batch_size)
        for key, value in mask_metrics(prob, masks[part].to(device)).items():
            scores[key].append(value)
    return {k: float(torch.cat(v).mean()) for k, v in scores.items()}
