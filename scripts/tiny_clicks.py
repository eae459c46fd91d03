"""The tiny SAM click by click: a checkpoint's plain score and the click protocol.

For a tiny-SAM checkpoint, prints (and with ``--json`` writes):

- the plain score of ``docs/pretraining.md``: mean IoU / Dice / MAE with 3 random positive
  points (seed 2) on the held-out source scenes of pretraining (``--source`` of them, from
  ``--source-start``: 0 is the set that chose checkpoints, 256 the next scenes of the stream);
- the click protocol (:mod:`regcl.evaluation.clicks`, 20 clicks) with and without mask
  feedback on those scenes, and on the first ``--per-domain`` test images of each target
  domain: IoU after 1/3/5/10 clicks, NoC@80/85/90.

Usage: python scripts/tiny_clicks.py [--checkpoint PATH] [--source 256] [--source-start 0]
       [--per-domain 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from regcl.data import synthetic
from regcl.data.domains import PAPER_ORDER, domain_split
from regcl.evaluation.clicks import click_curves, image_embeddings, interactive_summary
from regcl.evaluation.evaluate import evaluate_points
from regcl.models.build import build_sam
from regcl.training.pretrain import SOURCE_TEST_SEED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="tiny SAM weights (default: the shipped ones)")
    parser.add_argument("--source", type=int, default=256)
    parser.add_argument("--source-start", type=int, default=0)
    parser.add_argument("--per-domain", type=int, default=32, help="0: the source alone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    sam = build_sam("tiny", args.checkpoint)
    sets = {"source (pretraining held-out)": synthetic.chunked(
        synthetic.source_scenes, SOURCE_TEST_SEED, args.source_start, args.source, 256)}
    if args.per_domain:
        sets.update({d: domain_split(d, "test", args.per_domain) for d in PAPER_ORDER})
    report: dict = {"checkpoint": args.checkpoint or "shipped",
                    "source_scenes": [args.source_start, args.source_start + args.source - 1],
                    "sets": {}}
    for name, (images, masks) in sets.items():
        entry: dict = {"count": len(masks)}
        if name.startswith("source"):
            entry["plain"] = evaluate_points(sam, images, masks, seed=SOURCE_TEST_SEED)
        with torch.no_grad():
            embeddings = torch.cat([image_embeddings(sam, images)(slice(i, i + 32))
                                    for i in range(0, len(images), 32)])
        for mode, feedback in (("feedback", True), ("points", False)):
            curves = click_curves(sam, embeddings, masks, feedback=feedback)
            entry[mode] = {k: round(v, 4) for k, v in interactive_summary(curves).items()}
        report["sets"][name] = entry
        print(name, json.dumps(entry), flush=True)
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
