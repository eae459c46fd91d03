"""One cached prompt over real HTTP, as a before/after check of a serving change.

Starts a redis-server and the API (``python -m service.app``, one torch thread, as the tests
start it) from the checkout it runs in, uploads one 256 x 256 image, warms up with 20 prompts,
then times 300 one-point ``POST /v1/segment`` requests on that cached embedding over one
keep-alive connection and prints p50 and mean. For an A/B, run it alternately in two
worktrees (``git worktree add --detach /tmp/before <commit>``)::

    PYTHONPATH=$PWD .venv/bin/python scripts/cached_prompt_http.py after
"""

from __future__ import annotations

import io
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from infra.redis_server import RedisServer
from tests.service.api_support import ApiServer, server_env

REQUESTS = 300


def main(label: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="regcl-cached-prompt-"))
    server = RedisServer(tmp / "redis", port).start()
    api = ApiServer(server_env(server.url, tmp / "data"), tmp / "api.log").start()
    pixels = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    try:
        with httpx.Client(base_url=api.url, timeout=30) as client:
            image_id = client.post("/v1/images", files={
                "file": ("a.png", png.getvalue(), "image/png")}).json()["image_id"]

            def body(i: int) -> dict:
                return {"image_id": image_id, "points": [[100 + i % 50, 100]], "labels": [1]}

            for i in range(20):
                client.post("/v1/segment", json=body(i)).raise_for_status()
            times = []
            for i in range(REQUESTS):
                start = time.perf_counter()
                client.post("/v1/segment", json=body(i)).raise_for_status()
                times.append((time.perf_counter() - start) * 1000)
        print(f"{label}: cached prompt over HTTP, {REQUESTS} requests: "
              f"p50 {statistics.median(times):.2f} ms, mean {statistics.mean(times):.2f} ms")
    finally:
        api.stop()
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this checkout")
