"""Helpers of the bad-input catalogue: a snapshot of everything the service stores (the HTTP
listings, every Redis key and every file under the server's data directory) to prove a refused
request changed nothing, and builders of malformed inputs shared by several modules."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.service.api_support import ApiServer

LISTINGS = ("/v1/adapters", "/v1/datasets", "/v1/versions", "/v1/jobs")


@dataclass(frozen=True)
class Snapshot:
    """What the service has stored: listings (HTTP), Redis (key -> type and dumped value),
    files under the data directory (relative path -> sha256; the server log excluded)."""

    listings: dict[str, Any]
    redis: dict[str, tuple[str, bytes | None]]
    files: dict[str, str]


class Store:
    """Snapshots of the shared server's stored data."""

    def __init__(self, api: ApiServer, client: redis.Redis) -> None:
        self.api = api
        self.redis = client
        self.data_dir = Path(api.env["REGCL_DATA_DIR"])

    def files(self) -> dict[str, str]:
        out = {}
        for path in sorted(self.data_dir.rglob("*")):
            if path.is_file() and path.name != self.api.log_file.name:
                out[path.relative_to(self.data_dir).as_posix()] = \
                    hashlib.sha256(path.read_bytes()).hexdigest()
        return out

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until the API's domain router holds exactly the registered adapters with
        statistics. It copies each new one into the API's cache on its listener thread, through
        a staging directory a walk of the data directory could otherwise meet half made."""
        deadline = time.monotonic() + timeout
        with self.api.client() as client:
            while True:
                wanted = {a["name"]: a["sha256"] for a in client.get("/v1/adapters").json()[
                    "adapters"] if a["has_stats"]}
                info = client.get("/v1/router").json()
                held = {d["name"]: d["revision"] for d in info["domains"]}
                held.update({s["name"]: wanted.get(s["name"]) for s in info["skipped"]})
                if held == wanted:
                    return
                assert time.monotonic() < deadline, (wanted, info)
                time.sleep(0.05)

    def snapshot(self) -> Snapshot:
        self.settle()
        with self.api.client() as client:
            listings = {path: client.get(path).json() for path in LISTINGS}
        keys = sorted(k.decode() if isinstance(k, bytes) else k
                      for k in self.redis.scan_iter("*"))
        dumped = {k: (str(self.redis.type(k)), self.redis.dump(k)) for k in keys}
        return Snapshot(listings, dumped, self.files())

    @contextmanager
    def unchanged(self) -> Iterator[Snapshot]:
        """Assert that nothing stored changes inside the block."""
        before = self.snapshot()
        yield before
        after = self.snapshot()
        assert after.listings == before.listings
        assert after.redis.keys() == before.redis.keys()
        assert after.redis == before.redis
        assert after.files == before.files


def png_with_header(width: int, height: int, *, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with one tiny IDAT chunk (a
    decompression bomb as far as any decoder that trusts the header is concerned)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def image_file(image: Any, fmt: str = "PNG", **save: Any) -> bytes:
    """A PIL image saved as ``fmt``."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def post_json(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    """POST ``body`` serialised by Python's json module (NaN and Infinity included, as many
    clients send them; httpx's own json= refuses them)."""
    return client.post(path, content=json.dumps(body),
                       headers={"content-type": "application/json"})
