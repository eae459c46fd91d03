"""Seconds per pretraining step, the loop as it was against the loop as it is.

``old``: scenes and prompts made inline before each step, float32 forward.
``new``: scenes and prompts made in a helper thread while the previous step trains
(:func:`regcl.training.pretrain.prefetched_batches`), forward under CPU bfloat16 autocast.
Both train the shipped tiny SAM on the same batches (seed 11, batch 16) with the pretraining
loss; the first two steps are warm-up and not counted. Prints wall and process-CPU seconds a
step and the load average, because on a shared machine wall time says more about the
neighbours than about the code.

Usage: python scripts/pretrain_step_ab.py {old,new} THREADS STEPS
"""

from __future__ import annotations

import argparse
import time

import torch

from regcl.models.build import build_sam
from regcl.models.decoding import predict_masks_batched, preprocess, upscale_logits
from regcl.training.losses import segmentation_loss
from regcl.training.pretrain import (
    PRETRAIN_LOSS,
    PretrainConfig,
    prefetched_batches,
    training_batch,
)

WARMUP = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["old", "new"])
    parser.add_argument("threads", type=int)
    parser.add_argument("steps", type=int)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sam = build_sam("tiny")
    sam.train()
    optimizer = torch.optim.AdamW(sam.parameters(), lr=1e-5)
    config = PretrainConfig(steps=args.steps + WARMUP, seed=11, autocast_bf16=args.mode == "new")
    batches = prefetched_batches(config, 256) if args.mode == "new" else (
        training_batch(config, step, 256) for step in range(config.steps))
    wall = cpu = 0.0
    for step, (images, masks, prompts) in enumerate(batches):
        if step == WARMUP:
            wall, cpu = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast_bf16):
            emb = sam.image_encoder(preprocess(sam, images))
            low, iou = predict_masks_batched(sam, emb, **prompts)
        loss, _ = segmentation_loss(upscale_logits(low.float(), 256), iou.float(), masks,
                                    PRETRAIN_LOSS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        optimizer.step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"{args.mode} threads={args.threads}: {wall / args.steps:.2f} s/step wall, "
          f"{cpu / args.steps:.2f} CPU-s/step (load average {load})")


if __name__ == "__main__":
    main()
