"""A REAL S3 endpoint on localhost for the tests: moto's standalone server (``moto.server``,
the S3 protocol over HTTP, in its own process on a free port). Clients reach it the way a
deployment reaches MinIO or AWS: through the usual ``AWS_*`` variables (:meth:`MotoS3.env`),
read by botocore under s3fs; nothing in regcl knows it is talking to moto.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoS3:
    """``python -m moto.server`` on 127.0.0.1; its output goes to ``log``."""

    def __init__(self, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """The variables a process needs to use this endpoint (fake credentials)."""
        return {"AWS_ACCESS_KEY_ID": "regcl-test", "AWS_SECRET_ACCESS_KEY": "regcl-test-secret",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": self.url}

    def start(self) -> MotoS3:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited:\n{self.log.read_text()[-2000:]}")
            try:
                httpx.get(f"{self.url}/moto-api/", timeout=2.0)
                return self
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto server not up after {START_TIMEOUT_S} s")

    def create_bucket(self, name: str) -> str:
        """A new bucket (path-style PUT, as any S3 client sends it); returns ``s3://name``."""
        response = httpx.put(f"{self.url}/{name}", timeout=30.0)
        response.raise_for_status()
        return f"s3://{name}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
