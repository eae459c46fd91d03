"""Correctness checks of the serving path on a device (run by scripts/gpu_bench.sh).

For each model: the image encoder in bf16 / SDPA / fp32-SDPA against segment-anything's own
fp32 encoder on the same device (embedding error, mask agreement, mask IoU, IoU-score error;
the tolerances of tests/test_fast_attention.py are the gate for ``tiny``, whose weights are
trained; for random vit_* weights the figures are reported, not gated); a compiled bf16+SDPA
encoder that must not recompile across adapter swaps; on ``tiny`` also the engine on the
device against the CPU engine, and adapter training, Gram statistics and evaluation on the
device (the worker's GPU path). Writes one JSON object; exits 1 if a gated check fails.

Usage: python scripts/gpu_checks.py --device cuda --models tiny,vit_b --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

from regcl.adapters import AdapterConfig, attach_lora
from regcl.data import synthetic
from regcl.evaluation.evaluate import evaluate_points, evaluation_prompts
from regcl.models import build_sam, predict_masks_batched, preprocess, upscale_logits
from regcl.models.build import SAM_SPECS, build_sam_from_spec
from regcl.models.serving import ServingEncoder, lora_deltas

TOLERANCE = {"bf16": {"rel_l2": 0.02, "pixel_agreement": 0.999, "min_mask_iou": 0.95,
                      "score_diff": 0.01},
             "fp32-sdpa": {"rel_l2": 1e-4, "pixel_agreement": 0.9999, "min_mask_iou": 0.99,
                           "score_diff": 1e-3}}


def _model(name: str, device: str):
    if name == "tiny":
        return build_sam("tiny").to(device).eval()
    torch.manual_seed(0)
    return build_sam_from_spec(SAM_SPECS[name]).to(device).eval()


@torch.no_grad()
def _masks(sam, emb, coords, labels):
    low, iou = predict_masks_batched(sam, emb, coords, labels, multimask_output=True)
    return upscale_logits(low, sam.image_encoder.img_size) > 0, iou


def attention_checks(name: str, device: str, count: int) -> dict:
    sam = _model(name, device)
    size = sam.image_encoder.img_size
    images, masks = synthetic.chunked(synthetic.source_scenes, 99, 0, count, size)
    coords, labels = evaluation_prompts(masks, 0, 1)
    coords, labels = coords.to(device), labels.to(device)
    pixels = preprocess(sam, images.to(device))
    with torch.no_grad():
        reference = torch.cat([sam.image_encoder(pixels[i : i + 1]) for i in range(count)])
    ref_masks, ref_iou = _masks(sam, reference, coords, labels)
    out = {}
    for variant, dtype, sdpa in (("bf16", torch.bfloat16, False),
                                 ("bf16-sdpa", torch.bfloat16, True),
                                 ("fp32-sdpa", torch.float32, True)):
        encoder = ServingEncoder(sam.image_encoder, device=device, dtype=dtype, sdpa=sdpa)
        emb = encoder(pixels)
        got, iou = _masks(sam, emb, coords, labels)
        inter = (got & ref_masks).flatten(2).sum(-1).float()
        union = (got | ref_masks).flatten(2).sum(-1).float()
        mask_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        row = {"rel_l2": float((emb - reference).norm() / reference.norm()),
               "pixel_agreement": float((got == ref_masks).float().mean()),
               "min_mask_iou": float(mask_iou.min()),
               "score_diff": float((iou - ref_iou).abs().max())}
        tol = TOLERANCE["fp32-sdpa" if variant == "fp32-sdpa" else "bf16"]
        row["within_tolerance"] = (row["rel_l2"] <= tol["rel_l2"]
                                   and row["pixel_agreement"] >= tol["pixel_agreement"]
                                   and row["min_mask_iou"] >= tol["min_mask_iou"]
                                   and row["score_diff"] <= tol["score_diff"])
        row["gated"] = name == "tiny"
        out[variant] = row
        del encoder
    return out


def compile_swap_check(name: str, device: str) -> dict:
    sam = _model(name, device)
    size = sam.image_encoder.img_size
    torch._dynamo.reset()
    start = time.perf_counter()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    compiled = ServingEncoder(sam.image_encoder, device=device, dtype=dtype, sdpa=True,
                              compile=True, buckets=(2,))
    eager = ServingEncoder(sam.image_encoder, device=device, dtype=dtype, sdpa=True)
    pixels = torch.randn(2, 3, size, size, device=device)
    first = compiled(pixels)
    compile_s = time.perf_counter() - start
    peft_model = attach_lora(_model(name, device), AdapterConfig())
    diffs = []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, p in peft_model.named_parameters():
                if "lora_" in key:
                    p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.02)
        deltas = lora_deltas(peft_model.base_model.model.image_encoder, "default")
        start = time.perf_counter()
        compiled.fold(deltas)
        eager.fold(deltas)
        _sync(device)
        swap_ms = (time.perf_counter() - start) * 1000
        a, b = compiled(pixels), eager(pixels)
        diffs.append({"rel_l2": float((a - b).norm() / b.norm()), "fold_ms_both": swap_ms})
    compiled.fold(None)
    back = compiled(pixels)
    return {"compiles": compiled.compiles, "compile_s": round(compile_s, 1), "swaps": diffs,
            "base_restored_rel_l2": float((back - first).norm() / first.norm()),
            "ok": compiled.compiles == 1 and all(d["rel_l2"] < 0.02 for d in diffs)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def engine_check(device: str) -> dict:
    import numpy as np

    from service.engine.options import ServingOptions
    from service.engine.segmentation import SegmentationEngine

    image = (np.random.default_rng(0).random((200, 300, 3)) * 255).astype(np.uint8)
    points, labels = np.array([[120.0, 80.0]]), np.array([1])
    results = {}
    for label, options in (("cpu", ServingOptions()), ("device", ServingOptions(device=device))):
        engine = SegmentationEngine(build_sam("tiny"), cache_bytes=2**26, options=options)
        results[label] = engine.segment(engine.images.register(image), points, labels,
                                        multimask=False)
        engine.close()
    agreement = float((results["cpu"].masks == results["device"].masks).mean())
    return {"pixel_agreement": agreement,
            "score_diff": float(abs(results["cpu"].scores - results["device"].scores).max()),
            "ok": agreement >= 0.999}


def training_check(device: str) -> dict:
    from regcl.training.adapter import (
        TrainConfig,
        encoder_prefix_cache,
        evaluate_prefix,
        gram_stats_from_prefix,
        train_adapter,
    )

    images, masks = synthetic.chunked(synthetic.source_scenes, 5, 0, 16, 256)
    model = attach_lora(build_sam("tiny").to(device), AdapterConfig())
    prefix = encoder_prefix_cache(model, images.to(device))
    history = train_adapter(model, images.to(device), masks.to(device),
                            TrainConfig(epochs=2, batch_size=8), prefix=prefix)
    stats = gram_stats_from_prefix(model, prefix)
    scores = evaluate_prefix(model, prefix, masks.to(device))
    # The evaluation job's path (whole encoder, inputs on the device; it once sent CPU prompts).
    full = evaluate_points(model.base_model.model, images.to(device), masks.to(device))
    return {"loss": [h["loss"] for h in history], "iou": scores["iou"],
            "iou_full_encoder": full["iou"],
            "stats_on_cpu": all(v.device.type == "cpu" for v in stats.values()),
            "ok": all(v.device.type == "cpu" for v in stats.values())
            and history[-1]["loss"] == history[-1]["loss"]
            and abs(full["iou"] - scores["iou"]) < 1e-3}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="tiny,vit_b")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--compile-models", default="tiny")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    report: dict = {"device": args.device, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    failed = []

    def step(name: str, fn, *a) -> None:
        start = time.perf_counter()
        try:
            report[name] = fn(*a)
        except Exception:
            report[name] = {"error": traceback.format_exc(limit=5), "ok": False}
        report[name]["seconds"] = round(time.perf_counter() - start, 1)
        ok = report[name].get("ok", True)
        if isinstance(report[name], dict) and "error" not in report[name]:
            ok = ok and all(r.get("within_tolerance", True) or not r.get("gated")
                            for r in report[name].values() if isinstance(r, dict))
        if not ok:
            failed.append(name)
        print(name, json.dumps(report[name])[:400], flush=True)
        with open(args.json, "w") as f:
            json.dump({**report, "failed": failed}, f, indent=2)

    for model in [m for m in args.models.split(",") if m]:
        step(f"attention_{model}", attention_checks, model, args.device, args.images)
    for model in [m for m in args.compile_models.split(",") if m]:
        step(f"compile_swap_{model}", compile_swap_check, model, args.device)
    step("engine", engine_check, args.device)
    step("training", training_check, args.device)
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
