"""SAM's interactive training simulation: a first prompt, then rounds of corrective clicks.

SAM's paper (§A, "Training algorithm") trains the prompt encoder and mask decoder the way they
are used: after the first prompt's prediction, each next point is sampled uniformly from the
error region between the previous prediction and the ground truth (positive on a miss,
negative on a spill), and the previous prediction's *unthresholded* low-resolution logits go
back in as the mask prompt; the loss is taken on every round. Without it a model never sees
its own mask as a prompt and, as the tiny SAM did, gets worse with every click.

Here: round 0 decodes the caller's first prompt (whatever the recipe draws: points, a box,
one ambiguous point with the multimask outputs); ``rounds`` correction rounds follow, each
adding one click to the prompt (a box stays) and decoding single-mask; the loss is the mean
over all rounds. The fed-back logits are detached (the next round learns to *use* the mask,
not to change the previous round). With probability ``points_only`` an episode runs without
mask feedback, so decoding all clicks from scratch keeps working too. Clicks come from a
seeded generator on the CPU (same episode on every device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam

from regcl.errors import ConfigError
from regcl.models.decoding import predict_masks_batched, upscale_logits
from regcl.training.losses import LossWeights, segmentation_loss

__all__ = ["InteractiveConfig", "error_clicks", "interactive_loss"]


@dataclass(frozen=True)
class InteractiveConfig:
    """rounds: correction clicks after the first prompt (0: the first prompt only, i.e. the
    plain recipe); points_only: probability that an episode feeds no mask back."""

    rounds: int = 4
    points_only: float = 0.2

    def __post_init__(self) -> None:
        if not 0 <= self.rounds <= 32:
            raise ConfigError(f"rounds must be in [0, 32], got {self.rounds}")
        if not 0 <= self.points_only <= 1:
            raise ConfigError(f"points_only must be in [0, 1], got {self.points_only}")


def error_clicks(pred: torch.Tensor, target: torch.Tensor, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per image drawn uniformly from the error region (SAM's training clicks).

    Args:
        pred, target: B x H x W bool (on any device; the draw runs on the CPU).
    Returns:
        coords B x 1 x 2 float (x, y) pixel centres and labels B x 1 int64 on the CPU: 1 on a
        miss, 0 on a spill, −1 (a padding point) where the prediction has no error.
    """
    pred, target = pred.cpu(), target.cpu()
    b, h, w = target.shape
    error = (pred ^ target).reshape(b, -1).float()
    empty = error.sum(1) == 0
    error[empty] = 1.0
    index = torch.multinomial(error, 1, generator=gen)[:, 0]
    coords = torch.stack([index % w, index // w], -1).float() + 0.5
    labels = target.reshape(b, -1).gather(1, index[:, None])[:, 0].long()
    labels[empty] = -1
    coords[empty] = torch.tensor([w / 2, h / 2])
    return coords[:, None], labels[:, None]


def interactive_loss(sam: Sam, embeddings: torch.Tensor, masks: torch.Tensor, prompts: dict,
                     config: InteractiveConfig, weights: LossWeights, gen: torch.Generator
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one interactive episode per image (see the module doc).

    Args:
        embeddings: B x C x h x w image embeddings (with grad where the encoder trains).
        masks: B x S x S bool ground truth, S the model's input size.
        prompts: the first prompt, keyword arguments of
            :func:`~regcl.models.decoding.predict_masks_batched` (point_coords / point_labels
            on the model's device, boxes, multimask_output).
    Returns:
        the mean loss over rounds, and floats for logging: ``loss``, ``iou`` (round 0's, the
        plain recipe's figure) and ``iou_last`` (after the last round).
    """
    size = masks.shape[-1]
    device = embeddings.device
    low, iou_pred = predict_masks_batched(sam, embeddings, **prompts)
    total, stats = segmentation_loss(upscale_logits(low.float(), size), iou_pred.float(),
                                     masks, weights)
    first_iou = last_iou = stats["iou"]
    if config.rounds == 0:
        return total, {"loss": stats["loss"], "iou": first_iou, "iou_last": last_iou}
    if low.shape[1] > 1:  # ambiguous first prompt: go on with the mask it rates best (SAM)
        best = iou_pred.argmax(1)
        low = low[torch.arange(low.shape[0], device=device), best][:, None]
    feedback = bool(torch.rand((), generator=gen) >= config.points_only)
    coords = prompts.get("point_coords")
    labels = prompts.get("point_labels")
    if coords is None:
        coords = torch.zeros(masks.shape[0], 0, 2, device=device)
        labels = torch.zeros(masks.shape[0], 0, dtype=torch.int64, device=device)
    for _ in range(config.rounds):
        previous = low.detach().float()
        click, label = error_clicks(upscale_logits(previous, size)[:, 0] > 0, masks, gen)
        coords = torch.cat([coords, click.to(device)], 1)
        labels = torch.cat([labels, label.to(device)], 1)
        low, iou_pred = predict_masks_batched(
            sam, embeddings, coords, labels, boxes=prompts.get("boxes"),
            mask_inputs=previous if feedback else None)
        loss, stats = segmentation_loss(upscale_logits(low.float(), size), iou_pred.float(),
                                        masks, weights)
        total = total + loss
        last_iou = stats["iou"]
    total = total / (config.rounds + 1)
    return total, {"loss": float(total.detach()), "iou": first_iou, "iou_last": last_iou}
