"""Pretraining of the ``tiny`` SAM on the synthetic source domain (stands in for SA-1B).

Recipe: AdamW, linear warm-up then cosine decay, a fresh batch of source scenes every step
(nothing repeats), prompts varied per step as SAM trains them (points with and without
negatives, boxes, single points with multimask min-loss), SAM's loss (focal + Dice + IoU MSE).

Interactive stage (``rounds`` > 0, :mod:`regcl.training.interactive`): each step's first
prompt is followed by ``rounds`` error-region clicks with the previous logits fed back, loss on
every round; with ``freeze_encoder`` only the prompt encoder and mask decoder train (image
embeddings, and so adapters, Gram statistics and routing, stay what they were). The checkpoint
kept is then the best by the click-protocol score (mean IoU after clicks 1..10 with mask
feedback on ``click_eval_samples`` held-out scenes) among the evaluations whose plain mIoU is
at least ``min_miou``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from segment_anything.modeling import Sam

from regcl.data import synthetic
from regcl.data.prompts import mask_boxes, sample_points
from regcl.evaluation.clicks import click_curves, image_embeddings, interactive_summary
from regcl.evaluation.evaluate import evaluate_points
from regcl.models.build import SAM_SPECS, build_sam_from_spec
from regcl.models.decoding import preprocess
from regcl.training.interactive import InteractiveConfig, interactive_loss
from regcl.training.losses import LossWeights

logger = logging.getLogger(__name__)

SOURCE_TEST_SEED = 2
# BCE (focal with gamma 0, alpha 0.5 → BCE/2) + Dice: SAM's 20:1 focal:Dice collapses to empty
# masks for hundreds of steps at this scale (seen: mIoU 0.04 after 250 steps), BCE + Dice learns.
PRETRAIN_LOSS = LossWeights(focal=2.0, dice=1.0, iou=1.0, focal_alpha=0.5, focal_gamma=0.0)


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 4000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    warmup: int = 150
    weight_decay: float = 0.05
    seed: int = 0
    eval_every: int = 250
    eval_samples: int = 256
    # Mixed precision: encoder and decoder forward under CPU bfloat16 autocast (weights, optimiser
    # state, loss and evaluation stay float32). On the 2-core dev CPU (AVX512-BF16) a step costs
    # ~1.5x less CPU time; gradients agree with float32 to cosine 0.999 (docs/pretraining.md).
    autocast_bf16: bool = False
    # The interactive stage (module doc); rounds 0 is the plain recipe.
    rounds: int = 0
    points_only: float = 0.2
    freeze_encoder: bool = False
    min_miou: float = 0.0
    click_eval_samples: int = 64


def lr_factor(step: int, config: PretrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def prompt_batch(masks: torch.Tensor, gen: torch.Generator) -> dict:
    """Prompts for one training batch; the kind is drawn per batch so shapes stay static."""
    kind = int(torch.randint(0, 5, (1,), generator=gen))
    b = masks.shape[0]
    if kind == 0:  # single point: ambiguous, trained with multimask min-loss
        coords = sample_points(masks, 1, gen)
        return {"point_coords": coords, "point_labels": torch.ones(b, 1, dtype=torch.int64),
                "multimask_output": True}
    if kind == 1:  # box
        return {"boxes": mask_boxes(masks, gen, jitter=0.1)}
    if kind == 2:  # positives and one negative
        pos = sample_points(masks, 2, gen)
        neg = sample_points(masks, 1, gen, positive=False)
        labels = torch.tensor([1, 1, 0]).expand(b, 3)
        return {"point_coords": torch.cat([pos, neg], 1), "point_labels": labels}
    count = 3 if kind == 3 else int(torch.randint(2, 6, (1,), generator=gen))
    coords = sample_points(masks, count, gen)  # kind 3 is the evaluation protocol
    return {"point_coords": coords, "point_labels": torch.ones(b, count, dtype=torch.int64)}


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator that draws step ``step``'s scenes and prompts: one owner for the stream."""
    return torch.Generator().manual_seed(seed * 10_000_019 + step)


def click_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s interactive clicks (apart from the batch's stream, so
    the scenes and first prompts are those of the plain recipe)."""
    return torch.Generator().manual_seed(seed * 10_000_019 + step + 2**40)


def training_batch(config: PretrainConfig, step: int, size: int
                   ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Step ``step``'s batch: images B x 3 x S x S, masks B x S x S and its prompts; a pure
    function of (seed, step), so it does not matter which thread makes it."""
    gen = step_generator(config.seed, step)
    images, masks = synthetic.source_scenes(gen, config.batch_size, size)
    return images, masks, prompt_batch(masks, gen)


def prefetched_batches(config: PretrainConfig, size: int
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """:func:`training_batch` for steps 0 .. steps-1, each made in a helper thread while the
    previous step trains (torch releases the GIL in its kernels, so scene generation overlaps
    the step instead of adding to it). Yields exactly what the direct calls return."""
    if config.steps <= 0:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="scenes") as pool:
        pending = pool.submit(training_batch, config, 0, size)
        for step in range(config.steps):
            batch = pending.result()
            if step + 1 < config.steps:
                pending = pool.submit(training_batch, config, step + 1, size)
            yield batch


def pretrain_tiny(config: PretrainConfig, out_path: str | Path,
                  progress: Callable[[dict], None] | None = None,
                  init: str | Path | None = None) -> dict:
    """Train the tiny SAM and save the best checkpoint (by held-out mIoU) to ``out_path`` as
    safetensors. ``init``: start from these weights instead of from scratch (a continuation
    stage: give it its own ``seed`` so it sees new scenes). Returns the run summary."""
    from safetensors.torch import save_file

    from regcl.models.build import load_weights, read_state_dict

    torch.manual_seed(config.seed)
    spec = SAM_SPECS["tiny"]
    sam: Sam = build_sam_from_spec(spec)
    if init is not None:
        load_weights(sam, read_state_dict(init), source=str(init))
    sam.train()
    if config.freeze_encoder:
        sam.image_encoder.requires_grad_(False)
    size = spec.image_size
    trained = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    test_images, test_masks = synthetic.chunked(
        synthetic.source_scenes, SOURCE_TEST_SEED, 0, config.eval_samples, size
    )
    interactive = InteractiveConfig(config.rounds, config.points_only)
    best = {"miou": -1.0, "step": -1}
    history: list[dict] = []
    start = time.monotonic()
    running = None
    for step, (images, masks, prompts) in enumerate(prefetched_batches(config, size)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast_bf16):
            with torch.set_grad_enabled(not config.freeze_encoder):
                emb = sam.image_encoder(preprocess(sam, images))
            loss, stats = interactive_loss(sam, emb, masks, prompts, interactive,
                                           PRETRAIN_LOSS, click_generator(config.seed, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        scheduler.step()
        running = stats if running is None else {
            k: 0.98 * running[k] + 0.02 * stats[k] for k in stats
        }
        last = step + 1 == config.steps
        if (step + 1) % 50 == 0:
            logger.info("step %d loss %.4f iou %.4f last round %.4f", step + 1, running["loss"],
                        running["iou"], running["iou_last"])
        if (step + 1) % config.eval_every == 0 or last:
            scores = evaluate_points(sam, test_images, test_masks, seed=SOURCE_TEST_SEED)
            clicks = _click_scores(sam, test_images, test_masks, config)
            sam.train()
            elapsed = time.monotonic() - start
            record = {"step": step + 1, "elapsed_s": round(elapsed, 1),
                      "train_loss": round(running["loss"], 4),
                      "train_iou": round(running["iou"], 4),
                      "test_miou": round(scores["iou"], 4), "lr": scheduler.get_last_lr()[0]}
            if clicks:
                record.update(train_iou_last=round(running["iou_last"], 4), clicks=clicks)
            history.append(record)
            logger.info("pretrain %s", record)
            if progress:
                progress(record)
            if _better(scores["iou"], clicks, best, config):
                best = {"miou": scores["iou"], "dice": scores["dice"], "mae": scores["mae"],
                        "step": step + 1, **({"clicks": clicks} if clicks else {})}
                summary = {"recipe": asdict(config), "init": str(init) if init else None,
                           "best": best,
                           "elapsed_s": round(elapsed, 1), "torch": torch.__version__,
                           "threads": torch.get_num_threads()}
                Path(out_path).parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(str(out_path) + ".tmp")
                save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(tmp),
                          metadata={"regcl_pretrain": _json(summary)})
                tmp.replace(out_path)
    summary = {"recipe": asdict(config), "init": str(init) if init else None, "best": best,
               "history": history,
               "elapsed_s": round(time.monotonic() - start, 1), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    return summary


CLICK_EVAL_CLICKS = 10


def _click_scores(sam: Sam, images: torch.Tensor, masks: torch.Tensor, config: PretrainConfig
                  ) -> dict[str, float] | None:
    """The click protocol with mask feedback on the first ``click_eval_samples`` held-out
    scenes, 10 clicks: IoU after 1/3/5/10 clicks and ``score``, the mean IoU over clicks 1..10
    (None for the plain recipe)."""
    if config.rounds == 0 or config.click_eval_samples == 0:
        return None
    count = min(config.click_eval_samples, images.shape[0])
    with torch.no_grad():
        curves = click_curves(sam, image_embeddings(sam, images[:count]), masks[:count],
                              max_clicks=CLICK_EVAL_CLICKS)
    out = {k: round(v, 4) for k, v in interactive_summary(curves, thresholds=()).items()}
    return {**out, "score": round(float(curves.mean()), 4)}


def _better(miou: float, clicks: dict[str, float] | None, best: dict, config: PretrainConfig
            ) -> bool:
    """Is this evaluation the one to keep? Plain recipe: higher mIoU. Interactive stage: a
    higher click score with mIoU ≥ ``min_miou`` (an evaluation under the floor is kept only
    while none above it was seen, and then by mIoU)."""
    if clicks is None:
        return miou > best["miou"]
    qualifies, best_qualifies = miou >= config.min_miou, best["miou"] >= config.min_miou
    if qualifies != best_qualifies:
        return qualifies
    if not qualifies:
        return miou > best["miou"]
    return clicks["score"] > best.get("clicks", {}).get("score", -1.0)


def _json(obj: dict) -> str:
    import json

    return json.dumps(obj, sort_keys=True)
