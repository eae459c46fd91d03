"""The ``regcl`` command line: ``up``, ``demo``, ``bench cl``, ``pretrain``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("regcl")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _cmd_pretrain(args: argparse.Namespace) -> int:
    import torch

    from regcl.training.pretrain import PretrainConfig, pretrain_tiny

    if args.threads:
        torch.set_num_threads(args.threads)
    config = PretrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            seed=args.seed, eval_every=args.eval_every)
    summary = pretrain_tiny(config, args.out, init=args.init)
    text = json.dumps(summary, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(json.dumps(summary["best"]))
    return 0


def _cmd_bench_cl(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from regcl.bench.cl import BenchConfig, markdown_table, run_cl_benchmark
    from regcl.training.adapter import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    config = BenchConfig.quick() if args.quick else BenchConfig()
    overrides: dict = {}
    if args.domains:
        overrides["domains"] = tuple(d.strip() for d in args.domains.split(",") if d.strip())
    for name in ("orders", "train_per_domain", "test_per_domain", "checkpoint"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.epochs is not None:
        overrides["train"] = TrainConfig(epochs=args.epochs)
    config = dataclasses.replace(config, **overrides)
    report = run_cl_benchmark(config)
    table = markdown_table(report)
    print(table)
    print(f"\n{len(report['orders'])} orders, {len(config.domains)} domains, "
          f"{report['elapsed_s']:.0f} s on {report['machine']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        logger.info("wrote %s", args.json)
    return 0


def _cmd_bench_merge(args: argparse.Namespace) -> int:
    import torch

    from regcl.bench.merge import merge_markdown, run_merge_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_merge_benchmark(
        models=tuple(args.models.split(",")), methods=tuple(args.methods.split(",")),
        domains=tuple(int(d) for d in args.domains.split(",")),
        progress=lambda msg: logger.info("%s", msg))
    print(merge_markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        logger.info("wrote %s", args.json)
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    # The service lives beside the library; regcl/ imports it only here, on demand.
    try:
        from infra.settings import Settings
        from workers.up import run_up
    except ImportError as exc:  # an install of the library alone, without the service
        logger.error("regcl up needs the service packages (infra, workers, service): %s", exc)
        return 2
    return run_up(Settings())


def _cmd_demo(args: argparse.Namespace) -> int:
    import os

    try:
        from service.demo import run_demo
    except ImportError as exc:
        logger.error("regcl demo needs the service packages: %s", exc)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the demo prints its own progress
    key = args.admin_key or next(
        (k.strip() for k in os.environ.get("REGCL_ADMIN_KEYS", "").split(",") if k.strip()), "")
    return run_demo(args.url, key, domain=args.domain, train_images=args.train_images,
                    epochs=args.epochs)


def build_parser() -> argparse.ArgumentParser:
    from regcl.models.build import TINY_CHECKPOINT

    parser = argparse.ArgumentParser(prog="regcl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain the tiny SAM on the synthetic source domain")
    p.add_argument("--steps", type=int, default=4500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(TINY_CHECKPOINT), help="where to write the weights")
    p.add_argument("--init", help="continue from these weights (use a new --seed)")
    p.add_argument("--json", help="write the run summary (recipe, history, score) here")
    p.set_defaults(func=_cmd_pretrain)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    b = bench.add_parser("cl", help="the paper's continual-learning protocol on synthetic domains")
    b.add_argument("--quick", action="store_true", help="smoke run of about a minute")
    b.add_argument("--json", help="write the full report (matrices, per-domain scores) here")
    b.add_argument("--domains", help="comma-separated domain names, in the paper's order")
    b.add_argument("--orders", type=int, help="number of domain orders (default 3)")
    b.add_argument("--train-per-domain", type=int)
    b.add_argument("--test-per-domain", type=int)
    b.add_argument("--epochs", type=int, help="adapter training epochs (paper: 20)")
    b.add_argument("--checkpoint", help="tiny SAM weights (default: the shipped ones)")
    b.add_argument("--threads", type=int, default=0)
    b.set_defaults(func=_cmd_bench_cl)

    m = bench.add_parser("merge", help="continual merge time and state size vs. the number of "
                                       "domains, per model shape (no model is built)")
    # vit_h with regcl_product holds a 1.2 GB state and takes minutes on 2 CPU cores: opt in.
    m.add_argument("--models", default="tiny,vit_b,vit_l")
    m.add_argument("--methods", default="regcl,regcl_product")
    m.add_argument("--domains", default="1,2,5,10,20,50")
    m.add_argument("--json", help="write the report here")
    m.add_argument("--threads", type=int, default=0)
    m.set_defaults(func=_cmd_bench_merge)

    u = sub.add_parser("up", help="start Redis, a worker and the API (settings: REGCL_* env)")
    u.set_defaults(func=_cmd_up)

    d = sub.add_parser("demo", help="drive train → merge → activate → segment over HTTP "
                                    "against a running stack (regcl up)")
    d.add_argument("--url", default="http://127.0.0.1:8000")
    d.add_argument("--admin-key", help="default: the first of REGCL_ADMIN_KEYS")
    d.add_argument("--domain", default="polyp")
    d.add_argument("--train-images", type=int, default=24)
    d.add_argument("--epochs", type=int, default=3)
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from regcl.errors import RegclError

    try:
        return args.func(args)
    except RegclError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
