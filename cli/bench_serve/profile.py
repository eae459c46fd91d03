"""Where a cached prompt's time goes: py-spy on the API under ``bench serve``'s cached phase.

``python -m cli.bench_serve.profile [--clients 1,16] [--requests 600] [--out DIR]`` starts the
benchmark's stack (:mod:`cli.bench_serve.stack`), uploads and encodes 8 images, then for each
client count runs the cached phase (one point on a cached embedding per ``POST /v1/segment``)
from the load process while ``py-spy record`` samples every thread of the API process
(``--nonblocking``, so the API is not paused). The in-process ``SamPredictor.predict`` loop
runs right before and after each phase, as in ``regcl bench serve``, so each phase also gives
its same-run ratio.

Each sampled stack is put in one bucket: the first rule, in :data:`BUCKETS` order, that
names a frame of the stack (the model's work first, the HTTP layers last, so a thread hop or
a socket write made from inside a middleware counts as the hop or the write). A bucket's
samples divided by the sample rate and the requests served give its milliseconds of thread
time per request. Idle threads are not sampled, so the buckets add up to the CPU time the API
spent per request over every thread (a thread waiting for the GIL counts as running; under
the GIL only one runs Python at a time). Writes ``profile-c<N>.txt`` (py-spy's collapsed
stacks) and ``profile.json`` under ``--out``, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["BUCKETS", "bucket_of", "main", "summarise_collapsed"]

# (bucket, substrings of a frame "function (file:line)"); the first rule matching any frame
# of a stack takes the stack, so the model's own work is found even under a route's frames.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("mask decoder + prompt encoder (the model)", ("predict_masks_batched",)),
    ("upscale + threshold to image size (postprocess_masks)", ("postprocess_masks",)),
    ("prompt prep for the decoder (coords, tensors)", ("decode_rows",)),
    ("decoder thread: queue and futures", ("regcl-decoder", "_run_batch", "batching.py")),
    ("RLE encode", ("mask_to_rle", "_mask.pyx", "pycocotools")),
    ("bbox + area", ("mask_bbox", "mask_area")),
    ("prompt checks + engine (cache lookup, slot)", ("check_prompt", "check_bounds",
                                                    "engine.py", "adapter_table.py",
                                                    "encoding.py", "cache.py")),
    ("pydantic: request validation", ("validate_request", "request_body_to_args",
                                      "_validate_single", "validate_python",
                                      "validate_json")),
    ("response: validation + JSON", ("serialize_response", "jsonable_encoder", "render",
                                     "dump_python", "dump_json", "json/encoder",
                                     "orjson")),
    ("request body read + JSON parse", ("_get_body", "json/decoder", "json.loads",
                                        "loads (json", "body (starlette")),
    ("thread hop to the route's worker thread (anyio)", ("run_in_threadpool", "to_thread",
                                                         "anyio", "run_sync", "wrap_future",
                                                         "_chain_future", "_copy_future")),
    ("HTTP parsing + writing (h11 / httptools)", ("h11", "httptools", "uvicorn/protocols")),
    ("metrics + auth + body-limit middleware", ("metrics.py", "auth.py", "uploads.py",
                                                "prometheus_client")),
    ("routing + FastAPI/Starlette dispatch", ("routing.py", "starlette", "fastapi")),
    ("asyncio event loop", ("asyncio", "uvloop", "selectors")),
]
OTHER = "other"


def bucket_of(frames: list[str]) -> str:
    """The bucket of one sampled stack (frames root first, as py-spy's collapsed lines)."""
    for name, needles in BUCKETS:
        for frame in frames:
            if any(needle in frame for needle in needles):
                return name
    return OTHER


def summarise_collapsed(text: str, rate: int, requests: int) -> dict[str, Any]:
    """Bucket py-spy ``--format raw`` output (``frame;frame;... count`` lines): ms of thread
    time per request per bucket, and the hottest leaf frames."""
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        buckets[bucket_of(frames)] += n
        leaves[frames[-1]] += n
    per_request = 1000.0 / rate / max(requests, 1)
    order = [name for name, _ in BUCKETS] + [OTHER]
    return {"samples": total, "rate_hz": rate, "requests": requests,
            "ms_per_request": round(total * per_request, 3),
            "buckets": [{"bucket": name, "ms_per_request": round(buckets[name] * per_request, 3),
                         "share": round(buckets[name] / total, 3) if total else 0.0}
                        for name in order if buckets[name]],
            "top_leaves": [{"frame": f, "ms_per_request": round(n * per_request, 3)}
                           for f, n in leaves.most_common(15)]}


def _profile_phase(pid: int, out: Path, rate: int, run: Any) -> tuple[str, Any]:
    """Run ``run()`` while py-spy samples ``pid``; py-spy's collapsed stacks and the result."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
               "--nonblocking", "--threads", "--output", str(out)]
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        result = run()
    finally:
        recorder.send_signal(2)  # SIGINT: py-spy writes its output and exits
        _, err = recorder.communicate(timeout=60)
    if not out.exists():
        raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
    return out.read_text(), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cli.bench_serve.profile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    parser.add_argument("--baseline-requests", type=int, default=128,
                        help="SamPredictor.predict calls in each block around a phase")
    parser.add_argument("--out", default=None, help="folder for the stacks and profile.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    import torch

    from cli.bench_serve.config import ServeBenchConfig
    from cli.bench_serve.inprocess import BaselineLoop, build_sam
    from cli.bench_serve.load import Phase, summarise
    from cli.bench_serve.phases import LoadProcess, _mean_rate, _upload_images
    from cli.bench_serve.stack import running_stack
    from regcl.client import Client

    torch.set_num_threads(args.threads)
    config = ServeBenchConfig(threads=args.threads, cached_requests=args.baseline_requests)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="regcl-profile-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    sam = build_sam(config, None)
    size = sam.image_encoder.img_size
    baseline = BaselineLoop(config, sam, size)
    report: dict[str, Any] = {"command": " ".join(["python -m cli.bench_serve.profile",
                                                   *(argv or sys.argv[1:])]), "phases": []}
    env = {"REGCL_SERVE_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(prefix="regcl-profile-stack-") as tmp, \
            running_stack(Path(tmp), model="tiny", checkpoint=None, env=env) as stack:
        api = Client(stack.url, stack.admin_key, timeout=300.0)
        load = LoadProcess()
        try:
            ids = tuple(_upload_images(api, size, config.cached_images, 20_000_000))
            warm = Phase(name="warm", url=stack.url, mode="cached", concurrency=1,
                         requests=4 * len(ids), image_size=size, image_ids=ids)
            load.run(warm)
            for clients in (int(c) for c in args.clients.split(",")):
                phase = Phase(name=f"cached-c{clients}", url=stack.url, mode="cached",
                              concurrency=clients, requests=args.requests, image_size=size,
                              image_ids=ids)
                before = baseline.cached(config.cached_requests)
                text, result = _profile_phase(stack.pid, out_dir / f"profile-c{clients}.txt",
                                              args.rate, lambda p=phase: load.run(p))
                after = baseline.cached(config.cached_requests)
                row = summarise(result["records"])
                base = _mean_rate(before, after)
                entry = {"clients": clients, **row, "baseline_req_s": base,
                         "vs_baseline": round(row["throughput"] / base, 3),
                         "baseline_p50_ms": round((before["p50_ms"] + after["p50_ms"]) / 2, 2),
                         "profile": summarise_collapsed(text, args.rate, row["ok"])}
                report["phases"].append(entry)
                print(_table(entry), flush=True)
        finally:
            load.close()
            api.close()
    (out_dir / "profile.json").write_text(json.dumps(report, indent=1))
    print(f"\nstacks and profile.json in {out_dir}")
    return 0


def _table(entry: dict[str, Any]) -> str:
    prof = entry["profile"]
    lines = [f"\n{entry['clients']} client(s): {entry['throughput']} req/s, p50 "
             f"{entry['p50_ms']} ms; SamPredictor.predict loop around it "
             f"{entry['baseline_req_s']} req/s (p50 {entry['baseline_p50_ms']} ms): ratio "
             f"{entry['vs_baseline']:.2f}; API thread time {prof['ms_per_request']} ms/request",
             "", "| where | ms per request | share |", "|---|---|---|"]
    lines += [f"| {b['bucket']} | {b['ms_per_request']:.2f} | {100 * b['share']:.0f} % |"
              for b in prof["buckets"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
