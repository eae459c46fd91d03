"""Training one LoRA domain adapter with the RegCL paper's recipe, and collecting its Gram
statistics at the end.

Recipe (paper): frozen SAM, LoRA on the image encoder's last blocks; loss focal (α 0.8, γ 2)
+ 10·Dice + MSE on the IoU head; Adam, lr 5e-3 with cosine decay to 1e-7; 20 epochs of batch
8; prompts are 3 random positive points inside the ground-truth mask, drawn afresh each step.
Optionally (``interactive_rounds`` > 0) each step is an interactive episode
(:mod:`regcl.training.interactive`): those 3 points, then error-region clicks with the previous
logits fed back, loss on every round; the clicks come from a generator of their own, so the
batches and first prompts are the plain recipe's.
The frozen blocks before the first adapted one are run once per image and cached (exact: no
augmentation, nothing before the adapter changes), so a step costs only the adapted tail.

Devices: everything is computed on the model's device. Images, masks and the prefix cache
stay where the caller keeps them (the worker keeps them in host memory, so a GPU's memory does
not grow with the dataset) and each batch is moved to the model's device as it is used. Prompts
are drawn on the CPU from a seeded generator and then moved, so a seed gives the same prompts
on every device.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from peft import PeftModel

from regcl.adapters.stats import collect_gram_stats
from regcl.data.prompts import sample_points
from regcl.errors import CancelledError, ConfigError, DataError
from regcl.evaluation.clicks import click_curves
from regcl.evaluation.evaluate import evaluation_prompts
from regcl.evaluation.metrics import mask_metrics
from regcl.models.decoding import predict_masks_batched, preprocess, upscale_logits
from regcl.models.encoder import encode_prefix, encode_suffix
from regcl.training.interactive import InteractiveConfig, interactive_loss
from regcl.training.losses import LossWeights

logger = logging.getLogger(__name__)

Progress = Callable[[dict], None]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 8
    lr: float = 5e-3
    min_lr: float = 1e-7
    seed: int = 0
    n_points: int = 3
    loss: LossWeights = field(default_factory=LossWeights)
    interactive_rounds: int = 0
    points_only: float = 0.2

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.n_points < 1:
            raise ConfigError("epochs, batch_size and n_points must be >= 1")
        if not self.lr > 0 or self.min_lr < 0:
            raise ConfigError("lr must be > 0 and min_lr >= 0")
        InteractiveConfig(self.interactive_rounds, self.points_only)  # ConfigError if bad

    @property
    def interactive(self) -> InteractiveConfig:
        """The episode of a step (0 rounds: the first prompt alone, the paper's recipe)."""
        return InteractiveConfig(self.interactive_rounds, self.points_only)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def first_adapted_block(model: PeftModel) -> int:
    """Index of the first image-encoder block that holds LoRA weights."""
    sam = model.base_model.model
    for index, block in enumerate(sam.image_encoder.blocks):
        if any("lora_" in name for name, _ in block.named_parameters()):
            return index
    raise ConfigError("the model has no LoRA in its image encoder blocks")


@torch.no_grad()
def encoder_prefix_cache(model: PeftModel, images: torch.Tensor, batch_size: int = 32
                         ) -> torch.Tensor:
    """Tokens after the frozen blocks for every image: N x h x w x C (see module doc),
    computed on the model's device and kept on ``images``' device."""
    sam = model.base_model.model
    first = first_adapted_block(model)
    device = model_device(model)
    parts = [encode_prefix(sam.image_encoder,
                           preprocess(sam, images[i : i + batch_size].to(device)), first)
             .to(images.device) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(parts)


def _check_data(images: torch.Tensor, masks: torch.Tensor, size: int) -> None:
    if images.ndim != 4 or images.shape[1:] != (3, size, size):
        raise DataError(f"images must be N x 3 x {size} x {size}, got {tuple(images.shape)}")
    _check_masks(masks, images.shape[0], size)


def _check_masks(masks: torch.Tensor, count: int, size: int) -> None:
    if masks.shape != (count, size, size):
        raise DataError(f"masks must be N x {size} x {size}, got {tuple(masks.shape)}")
    if count == 0:
        raise DataError("no training images")
    empty = (~masks.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise DataError(f"{len(empty)} training masks are empty (e.g. index {empty[:3]})")


def train_adapter(model: PeftModel, images: torch.Tensor | None, masks: torch.Tensor,
                  config: TrainConfig = TrainConfig(), progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  prefix: torch.Tensor | None = None) -> list[dict]:
    """Train the model's LoRA weights in place on one domain.

    Args:
        model: a PeftModel around a Sam (only its LoRA weights are trained).
        images: N x 3 x S x S float in [0, 255] (may be None when ``prefix`` is given);
            masks: N x S x S bool (non-empty).
        progress: called after every step with ``{step, total_steps, epoch, loss, iou, lr}``.
        should_stop: polled every step; returning True raises :class:`CancelledError`.
        prefix: cached encoder prefix (:func:`encoder_prefix_cache`), computed if None.
    Returns:
        per-epoch history (mean loss and train IoU).
    """
    sam = model.base_model.model
    size = sam.image_encoder.img_size
    if images is None:
        if prefix is None:
            raise DataError("train_adapter needs the images or their encoder prefix")
        _check_masks(masks, prefix.shape[0], size)
    else:
        _check_data(images, masks, size)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    clicks = torch.Generator().manual_seed(config.seed + 2**40)
    first = first_adapted_block(model)
    device = model_device(model)
    if prefix is None:
        prefix = encoder_prefix_cache(model, images)
    if prefix.shape[0] != masks.shape[0]:
        raise DataError(f"{prefix.shape[0]} cached prefixes for {masks.shape[0]} masks")
    masks_cpu = masks.cpu()  # prompts are sampled here (see the module docstring)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    n = masks.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, config.min_lr)
    model.train()
    history: list[dict] = []
    step = 0
    start = time.monotonic()
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        sums = {"loss": 0.0, "iou": 0.0}
        for i in range(0, n, config.batch_size):
            if should_stop is not None and should_stop():
                raise CancelledError(f"training cancelled at step {step} of {total}")
            idx = order[i : i + config.batch_size]
            coords = sample_points(masks_cpu[idx], config.n_points, gen).to(device)
            labels = torch.ones(coords.shape[:2], dtype=torch.int64, device=device)
            emb = encode_suffix(sam.image_encoder, prefix[idx.to(prefix.device)].to(device),
                                first)
            loss, stats = interactive_loss(
                sam, emb, masks[idx.to(masks.device)].to(device),
                {"point_coords": coords, "point_labels": labels}, config.interactive,
                config.loss, clicks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            for k in sums:
                sums[k] += stats[k] * len(idx)
            if progress is not None:
                progress({"step": step, "total_steps": total, "epoch": epoch + 1,
                          "loss": stats["loss"], "iou": stats["iou"],
                          "lr": scheduler.get_last_lr()[0]})
        record = {"epoch": epoch + 1, "loss": sums["loss"] / n, "train_iou": sums["iou"] / n,
                  "elapsed_s": round(time.monotonic() - start, 2)}
        history.append(record)
        logger.debug("adapter epoch %s", record)
    model.eval()
    return history


def gram_stats_from_prefix(model: PeftModel, prefix: torch.Tensor, batch_size: int = 32
                           ) -> dict[str, torch.Tensor]:
    """Gram statistics of every LoRA input on a domain, from its cached encoder prefix."""
    sam = model.base_model.model
    first = first_adapted_block(model)
    device = model_device(model)

    def run() -> Iterator[None]:
        for i in range(0, prefix.shape[0], batch_size):
            encode_suffix(sam.image_encoder, prefix[i : i + batch_size].to(device), first)
            yield None

    return collect_gram_stats(model, run_batches=run)


def evaluate_prefix(model: PeftModel, prefix: torch.Tensor, masks: torch.Tensor,
                    seed: int = 0, n_points: int = 3, batch_size: int = 32) -> dict[str, float]:
    """Mean IoU / Dice / MAE on a domain from its cached encoder prefix, with the evaluation
    protocol's fixed prompts (same as :func:`regcl.evaluation.evaluate.evaluate_points`)."""
    per_image = evaluate_prefix_per_image(model, prefix, masks, seed, n_points, batch_size)
    return {k: float(v.mean()) for k, v in per_image.items()}


@torch.no_grad()
def evaluate_prefix_per_image(model: PeftModel, prefix: torch.Tensor, masks: torch.Tensor,
                              seed: int = 0, n_points: int = 3, batch_size: int = 32
                              ) -> dict[str, torch.Tensor]:
    """:func:`evaluate_prefix` image by image: IoU / Dice / MAE, each N float32 on the CPU."""
    sam = model.base_model.model
    first = first_adapted_block(model)
    size = sam.image_encoder.img_size
    device = model_device(model)
    coords, labels = evaluation_prompts(masks.cpu(), seed, n_points)
    coords, labels = coords.to(device), labels.to(device)
    model.eval()
    scores: dict[str, list[torch.Tensor]] = {"iou": [], "dice": [], "mae": []}
    for i in range(0, prefix.shape[0], batch_size):
        part = slice(i, i + batch_size)
        emb = encode_suffix(sam.image_encoder, prefix[part].to(device), first)
        low, _ = predict_masks_batched(sam, emb, coords[part], labels[part])
        prob = upscale_logits(low, size)[:, 0].sigmoid()
        for key, value in mask_metrics(prob, masks[part].to(device)).items():
            scores[key].append(value.float().cpu())  # computed on the device, N floats back
    return {k: torch.cat(v) for k, v in scores.items()}


def prefix_embeddings(model: PeftModel, prefix: torch.Tensor
                      ) -> Callable[[slice], torch.Tensor]:
    """An ``embed`` for :func:`regcl.evaluation.clicks.click_curves`: the adapted tail of
    the encoder on a slice of the cached prefix (N x h x w x C), on the model's device."""
    sam = model.base_model.model
    first = first_adapted_block(model)
    device = model_device(model)

    def embed(part: slice) -> torch.Tensor:
        return encode_suffix(sam.image_encoder, prefix[part].to(device), first)

    return embed


@torch.no_grad()
def click_curves_prefix(model: PeftModel, prefix: torch.Tensor, masks: torch.Tensor,
                        max_clicks: int = 20, feedback: bool = True, batch_size: int = 32
                        ) -> torch.Tensor:
    """The click protocol (:func:`regcl.evaluation.clicks.click_curves`) from a domain's
    cached encoder prefix: N x max_clicks IoU on the CPU."""
    model.eval()
    return click_curves(model.base_model.model, prefix_embeddings(model, prefix), masks,
                        max_clicks=max_clicks, feedback=feedback, batch_size=batch_size)
