"""The ``regcl`` command line: ``up``, ``demo``,
``bench cl|interactive|merge|auto-memory|route|serve|campaign``, ``pretrain``.

The entry points sit above every layer (they may import the library, ``infra``, ``workers``
and ``service``; nothing imports them). Each command imports what it needs when it runs, so
``regcl bench cl`` starts without the service's packages being loaded. Run it as ``regcl`` or
``python -m cli``.
"""

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
                            seed=args.seed, eval_every=args.eval_every,
                            autocast_bf16=args.bf16, rounds=args.rounds,
                            points_only=args.points_only, freeze_encoder=args.freeze_encoder,
                            min_miou=args.min_miou)
    summary = pretrain_tiny(config, args.out, init=args.init)
    text = json.dumps(summary, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(json.dumps(summary["best"]))
    return 0


def _cmd_bench_cl(args: argparse.Namespace) -> int:
    from regcl.bench.cl import config_from_options, run_cl_benchmark
    from regcl.bench.cl_output import write_outputs

    config = config_from_options(
        quick=args.quick, domains=args.domains, seeds=args.seeds, first_seed=args.first_seed,
        methods=args.methods, probes=args.probes,
        sweep=args.sweep, epochs=args.epochs, orders=args.orders,
        train_per_domain=args.train_per_domain, test_per_domain=args.test_per_domain,
        checkpoint=args.checkpoint, threads=args.threads, workers=args.workers,
        default_method=args.default_method, final_only=args.final_only or None,
        cache_dir=args.cache, interactive_rounds=args.interactive_rounds)
    if args.route_only:
        from regcl.bench.cl_route import route_text, run_route_calibration

        report = run_route_calibration(config)
        print(write_outputs(report, json_path=args.json, text=route_text))
        return 0
    report = run_cl_benchmark(config)
    print(write_outputs(report, json_path=args.json, figure_path=args.figure))
    return 0


def _cmd_bench_interactive(args: argparse.Namespace) -> int:
    from regcl.bench.cl_config import config_from_options
    from regcl.bench.cl_output import write_outputs
    from regcl.bench.interactive import (
        InteractiveBenchConfig,
        combine_reports,
        interactive_tables,
        run_interactive_benchmark,
    )

    if args.combine:
        reports = [json.loads(Path(path).read_text()) for path in args.combine]
        print(write_outputs(combine_reports(reports), json_path=args.json,
                            text=interactive_tables))
        return 0
    start = InteractiveBenchConfig.quick() if args.quick else InteractiveBenchConfig()
    bench = config_from_options(
        base=start.bench, domains=args.domains, seeds=args.seeds, first_seed=args.first_seed,
        epochs=args.epochs, default_method=args.default_method,
        train_per_domain=args.train_per_domain, test_per_domain=args.test_per_domain,
        checkpoint=args.checkpoint, threads=args.threads, workers=args.workers,
        cache_dir=args.cache)
    arms = start.arms if args.arms is None else tuple(
        int(a) for a in args.arms.split(",") if a.strip())
    config = InteractiveBenchConfig(bench, arms, args.max_clicks or start.max_clicks)
    report = run_interactive_benchmark(config)
    print(write_outputs(report, json_path=args.json, text=interactive_tables))
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


def _cmd_bench_auto_memory(args: argparse.Namespace) -> int:
    from cli.auto_memory import run

    print(run(tuple(args.models.split(","))))
    return 0


def _cmd_bench_route(args: argparse.Namespace) -> int:
    import dataclasses

    from regcl.bench.route_scale import run_route_scale, scale_text
    from regcl.bench.route_study import RouteStudyConfig, route_study_text, run_route_study

    config = RouteStudyConfig.quick() if args.quick else RouteStudyConfig()
    changes = {k: v for k, v in (("train_images", args.train_images),
                                 ("test_images", args.test_images)) if v is not None}
    if args.seeds:
        changes["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    config = dataclasses.replace(config, **changes)
    report: dict = {}
    if not args.scale_only:
        report["study"] = run_route_study(config)
        print(route_study_text(report["study"]))
    if not args.skip_scale:
        report["scale"] = run_route_scale(domains=(10, 30) if args.quick else (10, 100, 1000),
                                          threads=config.threads)
        print()
        print(scale_text(report["scale"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import signal

    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so the stack this run started (its
    # redis-server and API process) is stopped rather than left behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    from cli.bench_serve import ServeBenchConfig, run_serve_benchmark, serve_markdown

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x.strip())

    overrides: dict = {"model": args.model, "device": args.device,
                       "random_weights": args.random_weights, "threads": args.threads}
    for name in ("checkpoint", "url", "admin_key", "requests", "cached_requests", "warmup",
                 "baseline_requests", "swaps", "train_images", "train_epochs", "train_batch"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.concurrency:
        overrides["concurrency"] = ints(args.concurrency)
    if args.swap_versions:
        overrides["swap_versions"] = ints(args.swap_versions)
    if args.encoder_variants is not None:
        overrides["encoder_variants"] = tuple(v for v in args.encoder_variants.split(",") if v)
    if args.encoder_batches:
        overrides["encoder_batches"] = ints(args.encoder_batches)
    if args.auto_domains is not None:
        overrides["auto_domains"] = ints(args.auto_domains)
    if args.auto_requests is not None:
        overrides["auto_requests"] = args.auto_requests
    env = {}
    for flag, var in (("dtype", "REGCL_SERVE_DTYPE"), ("attention", "REGCL_SERVE_ATTENTION"),
                      ("batch_size", "REGCL_ENCODER_BATCH_SIZE"),
                      ("batch_wait_ms", "REGCL_ENCODER_BATCH_WAIT_MS"),
                      ("server_threads", "REGCL_SERVE_THREADS")):
        value = getattr(args, flag)
        if value is not None:
            env[var] = str(value)
    if args.compile:
        env["REGCL_SERVE_COMPILE"] = "true"
    overrides["server_env"] = env
    config = (ServeBenchConfig.quick(**overrides) if args.quick
              else dataclasses.replace(ServeBenchConfig(), **overrides))
    logging.getLogger("httpx").setLevel(logging.WARNING)
    report = run_serve_benchmark(config)
    print(serve_markdown(report))
    print(f"\n{report['elapsed_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        logger.info("wrote %s", args.json)
    return 0


def _cmd_bench_campaign(args: argparse.Namespace) -> int:
    import dataclasses
    import signal

    # SIGTERM unwinds like Ctrl-C, so the stack of the seed running (redis-server, worker,
    # API) is stopped rather than left behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    from cli.bench_campaign import CampaignConfig, run_campaign
    from cli.bench_campaign.figure import campaign_figure
    from cli.bench_campaign.report import (
        campaign_markdown,
        resummarise,
        summarise_partials,
        write_json,
    )

    if args.from_partials or args.from_json:  # re-render a report, or assemble partial seeds
        report = (summarise_partials([Path(p) for p in args.from_partials.split(",")])
                  if args.from_partials
                  else resummarise(json.loads(Path(args.from_json).read_text())))
        if args.json:
            write_json(report, args.json)
        if args.figure:
            campaign_figure(report, args.figure)
        print(campaign_markdown(report))
        return 0
    overrides: dict = {}
    for name in ("tasks", "heldout", "train_every", "epochs", "rank", "lr", "batch_size",
                 "interactive_rounds"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.domains:
        overrides["domains"] = tuple(d.strip() for d in args.domains.split(",") if d.strip())
    if args.seeds is not None:
        overrides["seeds"] = tuple(range(args.first_seed, args.first_seed + args.seeds))
    config = (CampaignConfig.quick(**overrides) if args.quick
              else dataclasses.replace(CampaignConfig(), **overrides))
    logging.getLogger("httpx").setLevel(logging.WARNING)

    def say(line: str) -> None:
        print(line, flush=True)

    partial = Path(args.json).with_suffix("") if args.json else None
    report = run_campaign(config, say=say, partial_stem=partial)
    if args.json:
        write_json(report, args.json)
        logger.info("wrote %s", args.json)
    if args.figure:
        campaign_figure(report, args.figure)
        logger.info("wrote %s", args.figure)
    print(campaign_markdown(report))
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from cli.up import run_up
    from infra.settings import Settings

    return run_up(Settings())


def _cmd_demo(args: argparse.Namespace) -> int:
    from cli.demo import run

    logging.getLogger("httpx").setLevel(logging.WARNING)  # the demo prints its own progress
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from cli.demo import add_arguments as demo_arguments
    from regcl.models.build import TINY_CHECKPOINT

    parser = argparse.ArgumentParser(prog="regcl", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--bf16", action="store_true",
                   help="mixed precision: forward under CPU bfloat16 autocast (weights, loss and "
                        "evaluation stay float32); ~1.5x less CPU a step")
    p.add_argument("--rounds", type=int, default=0,
                   help="interactive stage: error-region clicks after each first prompt, the "
                        "previous logits fed back, loss on every round (0: the plain recipe)")
    p.add_argument("--points-only", type=float, default=0.2,
                   help="with --rounds: share of episodes without mask feedback")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train only the prompt encoder and mask decoder (image embeddings, "
                        "adapters, Gram statistics and routing stay valid)")
    p.add_argument("--min-miou", type=float, default=0.0,
                   help="with --rounds: keep the best click score among checkpoints whose "
                        "plain held-out mIoU is at least this")
    p.set_defaults(func=_cmd_pretrain)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    b = bench.add_parser("cl", help="the paper's continual-learning protocol on synthetic domains")
    b.add_argument("--quick", action="store_true", help="smoke run of a few minutes")
    b.add_argument("--json", help="write the full report (every matrix, per-domain scores) here")
    b.add_argument("--figure", help="write a PNG of AA / FM / gap / routing vs. domains here")
    b.add_argument("--domains", help="comma-separated domain names in learning order, or 'long' "
                                     "for the ten-domain sequence")
    b.add_argument("--orders", type=int, help="number of domain orders (default 3)")
    b.add_argument("--seeds", type=int, help="number of seeds K (default 1)")
    b.add_argument("--first-seed", type=int, help="seeds are first..first+K-1 (default 0)")
    b.add_argument("--route-only", action="store_true", help="the router alone (no training): "
                                                             "accuracy, margins, novelty")
    b.add_argument("--probes", help="comma-separated domains no adapter learns, routed as "
                                    "images from nowhere (default: source)")
    b.add_argument("--methods", nargs="+", help="merge specs, e.g. regcl regcl_product:ridge=1e-6")
    b.add_argument("--default-method", help="the merge `auto` falls back to (default: "
                                            "the service's)")
    b.add_argument("--sweep", action="store_true", help="also score the merge variants "
                                                        "(ridges, weightings, core space)")
    b.add_argument("--final-only", action="store_true", help="no orders nor sequential "
                                                             "fine-tuning: final merges only")
    b.add_argument("--train-per-domain", type=int)
    b.add_argument("--test-per-domain", type=int)
    b.add_argument("--epochs", type=int, help="adapter training epochs (paper: 20)")
    b.add_argument("--checkpoint", help="tiny SAM weights (default: the shipped ones)")
    b.add_argument("--threads", type=int, help="torch threads per worker (default 1; the "
                                               "numbers depend on it)")
    b.add_argument("--workers", type=int, help="worker processes (default 1; the numbers do "
                                               "not depend on it)")
    b.add_argument("--cache", help="keep trained adapters in this folder and reuse those of "
                                   "earlier runs with the same training settings")
    b.add_argument("--interactive-rounds", type=int,
                   help="train the adapters with SAM's interactive simulation: this many "
                        "error-region clicks after the first prompt (default 0: the recipe)")
    b.set_defaults(func=_cmd_bench_cl)

    i = bench.add_parser("interactive", help="the click protocol (IoU after 1/3/5/10 clicks, "
                                             "NoC@80/85/90, with and without mask feedback) "
                                             "for base, adapters, merge and auto; adapters "
                                             "trained per arm (recipe vs interactive)")
    i.add_argument("--quick", action="store_true", help="smoke run of a few minutes")
    i.add_argument("--json", help="write the full report (per seed and domain) here")
    i.add_argument("--arms", help="comma-separated interactive rounds of the adapter training "
                                  "arms (default 0,4: the recipe and 4 rounds; '': the base "
                                  "model alone)")
    i.add_argument("--max-clicks", type=int, help="clicks per object, the NoC cap (default 20)")
    i.add_argument("--domains", help="comma-separated target domains (default: the paper's 5)")
    i.add_argument("--seeds", type=int, help="number of seeds K (default 3)")
    i.add_argument("--first-seed", type=int, help="seeds are first..first+K-1 (default 0)")
    i.add_argument("--default-method", help="the merge scored, and auto's fallback")
    i.add_argument("--train-per-domain", type=int)
    i.add_argument("--test-per-domain", type=int)
    i.add_argument("--epochs", type=int, help="adapter training epochs (paper: 20)")
    i.add_argument("--checkpoint", help="tiny SAM weights (default: the shipped ones)")
    i.add_argument("--threads", type=int, help="torch threads per worker (default 1)")
    i.add_argument("--workers", type=int, help="worker processes (default 1)")
    i.add_argument("--cache", help="keep trained adapters in this folder and reuse them")
    i.add_argument("--combine", nargs="+", metavar="REPORT",
                   help="run nothing: pool these --json reports (same settings, disjoint "
                        "seeds) into one, summarised and paired over all their seeds")
    i.set_defaults(func=_cmd_bench_interactive)

    m = bench.add_parser("merge", help="continual merge time and state size vs. the number of "
                                       "domains, per model shape (no model is built)")
    # vit_h with regcl_product holds a 1.2 GB state and takes minutes on 2 CPU cores: opt in.
    m.add_argument("--models", default="tiny,vit_b,vit_l")
    m.add_argument("--methods", default="regcl,regcl_product")
    m.add_argument("--domains", default="1,2,5,10,20,50")
    m.add_argument("--json", help="write the report here")
    m.add_argument("--threads", type=int, default=0)
    m.set_defaults(func=_cmd_bench_merge)

    a = bench.add_parser("auto-memory", help="what adapter auto holds per domain (adapter, "
                                             "statistics, router) against the merge's one "
                                             "live adapter, per model shape (no weights)")
    a.add_argument("--models", default="tiny,vit_b")
    a.set_defaults(func=_cmd_bench_auto_memory)

    r = bench.add_parser("route", help="the served domain router against the full Gaussian: "
                                       "accuracy, few images, unseen images, cost vs domains")
    r.add_argument("--quick", action="store_true", help="smoke run of a few minutes")
    r.add_argument("--json", help="write the full report here")
    r.add_argument("--seeds", help="comma-separated seeds of the tables (default 0,1,2)")
    r.add_argument("--train-images", type=int, help="images behind each domain's statistics")
    r.add_argument("--test-images", type=int, help="test images per domain and seed")
    r.add_argument("--scale-only", action="store_true", help="only the cost table")
    r.add_argument("--skip-scale", action="store_true", help="no cost table")
    r.set_defaults(func=_cmd_bench_route)

    s = bench.add_parser("serve", help="the service over HTTP (new images, cached prompts, "
                                       "hot swap, LoRA overhead) against SamPredictor in the "
                                       "same run; encoder variants; adapter training")
    s.add_argument("--quick", action="store_true", help="smoke run of about a minute")
    s.add_argument("--json", help="write the full report here")
    s.add_argument("--model", default="tiny", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    s.add_argument("--checkpoint", help="SAM weights (vit_*: required unless --random-weights)")
    s.add_argument("--random-weights", action="store_true",
                   help="serve a seeded random SAM (speed only; vit_* without a checkpoint)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:<n> (service and baseline)")
    s.add_argument("--url", help="benchmark this running service instead of starting one")
    s.add_argument("--admin-key", help="with --url: for activations (hot swap)")
    s.add_argument("--swap-versions", help="with --url: two version numbers to swap between")
    s.add_argument("--concurrency", help="client counts, e.g. 1,4,16")
    s.add_argument("--requests", type=int, help="new-image requests per concurrency level")
    s.add_argument("--cached-requests", type=int)
    s.add_argument("--baseline-requests", type=int)
    s.add_argument("--warmup", type=int, help="untimed new-image requests first")
    s.add_argument("--swaps", type=int, help="activations in the hot-swap phase")
    s.add_argument("--train-images", type=int)
    s.add_argument("--train-epochs", type=int)
    s.add_argument("--train-batch", type=int, help="adapter training batch (recipe: 8)")
    s.add_argument("--encoder-variants", help="comma-separated, of: fp32, fp32-sdpa, bf16, "
                                              "bf16-sdpa, bf16-sdpa-compile, fp32-compile "
                                              "('' skips)")
    s.add_argument("--encoder-batches", help="batch sizes of the encoder section, e.g. 1,8")
    s.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="service encoder")
    s.add_argument("--attention", choices=["auto", "sdpa", "original"], help="service encoder")
    s.add_argument("--compile", action="store_true", help="service: torch.compile the encoder")
    s.add_argument("--batch-size", type=int, help="service: most images per encoder batch")
    s.add_argument("--batch-wait-ms", type=float, help="service: longest batch wait")
    s.add_argument("--server-threads", type=int, help="service: torch threads")
    s.add_argument("--threads", type=int, default=0, help="torch threads of this process")
    s.add_argument("--auto-domains", help="auto rows: images from this many interleaved "
                                          "domains each, e.g. 5,16 (at most 16; '' skips)")
    s.add_argument("--auto-requests", type=int, help="new images per auto / live row and run")
    s.set_defaults(func=_cmd_bench_serve)

    c = bench.add_parser("campaign", help="simulated annotators label one Label Studio project "
                                          "per domain through the service's routes; clicks "
                                          "counted (NoC@85/90, IoU@1/3/5) for static base, "
                                          "live merge and per-project serving (#22)")
    c.add_argument("--quick", action="store_true", help="smoke run of a few minutes")
    c.add_argument("--json", help="write the full report (per seed) here")
    c.add_argument("--figure", help="write the figure (NoC@90 against tasks labelled) here")
    c.add_argument("--domains", help="comma-separated target domains (default: the paper's 5)")
    c.add_argument("--seeds", type=int, help="number of seeds K (default 3)")
    c.add_argument("--first-seed", type=int, default=0, help="seeds are first..first+K-1")
    c.add_argument("--tasks", type=int, help="tasks labelled per project (default 64)")
    c.add_argument("--heldout", type=int, help="held-out tasks per domain (default 16)")
    c.add_argument("--train-every", type=int, help="Start Training every this many tasks")
    c.add_argument("--epochs", type=int, help="epochs of each continual step's training")
    c.add_argument("--rank", type=int, help="LoRA rank of the steps' adapters")
    c.add_argument("--lr", type=float, help="learning rate of the steps' training")
    c.add_argument("--batch-size", type=int, help="batch size of the steps' training")
    c.add_argument("--interactive-rounds", type=int, help="the steps' interactive training")
    c.add_argument("--from-json", help="no run: this report's tables computed again from its "
                                       "seeds (printed; --json, --figure written)")
    c.add_argument("--from-partials", help="comma-separated <json>.seed<k>.partial.json files "
                                           "of an unfinished run: their report")
    c.set_defaults(func=_cmd_bench_campaign)

    u = sub.add_parser("up", help="start Redis, a worker and the API (settings: REGCL_* env)")
    u.set_defaults(func=_cmd_up)

    d = sub.add_parser("demo", help="drive train → merge → activate → segment over HTTP "
                                    "against a running stack (regcl up)")
    demo_arguments(d)
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
