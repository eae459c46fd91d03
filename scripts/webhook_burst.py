"""A burst of Label Studio annotation webhooks while annotators click (issue #24, case 4).

Starts a redis-server, the tests' file origin (standing in for Label Studio's file serving)
and the API (``python -m service.app``, one torch thread, as the tests start it) from the
checkout it runs in. Then: ``--clickers`` annotators post ``/labelstudio/predict`` (a keypoint,
``--think-s`` apart, 5 clicks per image) for ``--quiet-s`` seconds alone, then go on clicking
while ``--count`` ANNOTATION_CREATED webhooks (each its own task, its own ``--size`` JPEG, one
brush mask) are sent open-loop at ``--rate`` per second. Afterwards it waits until the
project's sample set holds them and prints one JSON object: webhook answers (by status, p50 /
p99 / max ms from each send), the rate reached, clicks quiet vs during the burst, stored /
lost / duplicated annotations and missing files (exit status 1 if any was lost or duplicated).
Default: 1,000 webhooks at 50/s (20 s)::

    PYTHONPATH=$PWD .venv/bin/python scripts/webhook_burst.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from infra.artifacts import ArtifactStore
from infra.datasets import DatasetRegistry
from infra.redis_client import connect
from infra.redis_server import RedisServer
from infra.sample_sets import SampleSets, default_domain
from tests.labelstudio.burst import (
    Clickers,
    make_burst,
    percentiles,
    send_open_loop,
    stored_figures,
    wait_stored,
)
from tests.labelstudio.file_origin import TOKEN, FileOrigin
from tests.service.api_support import ApiServer, make_image, png_bytes, server_env

logger = logging.getLogger("webhook_burst")
PROJECT = 900


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="regcl-webhook-burst-"))
    server = RedisServer(tmp / "redis", _free_port()).start()
    with FileOrigin() as origin:
        api = ApiServer(server_env(server.url, tmp / "data", REGCL_LABEL_STUDIO_URL=origin.url,
                                   REGCL_LABEL_STUDIO_API_KEY=TOKEN,
                                   REGCL_LABEL_STUDIO_FETCH_TIMEOUT_S="10"),
                        tmp / "api.log").start()
        try:
            height, width = args.size
            events = make_burst(origin, PROJECT, args.count, (height, width))
            paths = [[origin.add(f"/data/upload/{PROJECT}/click-{k}-{j}.png",
                                 png_bytes(make_image(5000 + 100 * k + j, 256, 256)))
                      for j in range(40)] for k in range(args.clickers)]
            clickers = Clickers(api.url, paths, think_s=args.think_s).start()
            time.sleep(args.quiet_s)
            burst_start = time.monotonic()
            answers = send_open_loop(api.url, events, args.rate)
            burst_end = max(a.sent + a.seconds for a in answers)
            time.sleep(1.0)
            clicks = clickers.stop()
            client = connect(server.url)
            domain = default_domain(PROJECT)
            waited = wait_stored(client, domain, args.count, args.settle_s)
            settle = None if waited is None else time.monotonic() - burst_end
            store = ArtifactStore(api.env["REGCL_ARTIFACT_URL"])
            sets = SampleSets(client, store, DatasetRegistry(client, store))
            stored = stored_figures(client, sets, domain, [e["annotation"]["id"] for e in events])
            sends = [a.sent for a in answers]
            quiet = [c.seconds for c in clicks if c.sent < burst_start and c.status == 200]
            during = [c.seconds for c in clicks
                      if burst_start <= c.sent <= burst_end and c.status == 200]
            return {
                "count": args.count, "rate_asked": args.rate,
                "rate_reached": round((len(sends) - 1) / (max(sends) - min(sends)), 2),
                "image": f"{width}x{height} JPEG", "clickers": args.clickers,
                "webhook_status": dict(Counter(str(a.status) for a in answers)),
                "webhook_answers": dict(Counter(a.body["status"] for a in answers if a.body)),
                "webhook_ms": percentiles([a.seconds for a in answers]),
                "over_1s": sum(a.seconds > 1.0 for a in answers),
                "burst_s": round(burst_end - burst_start, 2),
                "all_stored_s_after_burst": None if settle is None else round(settle, 2),
                **stored,
                "click_status": dict(Counter(str(c.status) for c in clicks)),
                "clicks_quiet_ms": percentiles(quiet), "clicks_burst_ms": percentiles(during),
            }
        finally:
            api.stop()
            server.stop()
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0, help="webhooks per second")
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640),
                        metavar=("HEIGHT", "WIDTH"), help="each task's image")
    parser.add_argument("--clickers", type=int, default=4)
    parser.add_argument("--think-s", type=float, default=0.3)
    parser.add_argument("--quiet-s", type=float, default=10.0)
    parser.add_argument("--settle-s", type=float, default=300.0,
                        help="how long to wait for every webhook's masks to be stored")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    figures = run(args)
    text = json.dumps(figures, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0 if figures["lost"] == 0 and figures["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
