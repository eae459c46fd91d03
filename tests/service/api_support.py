"""Helpers of the HTTP API tests: the REAL server (``python -m service.app``, i.e. uvicorn)
in a subprocess on a free port, configured through ``REGCL_*`` variables; test data (images,
LoRA adapters); problem+json assertions. The fixtures are in ``conftest.py`` next to it.

Two clients per server: :meth:`ApiServer.client` (raw httpx, for tests of the HTTP contract
itself: status codes, headers, problem bodies) and :meth:`ApiServer.api` (the library's typed
:class:`regcl.client.Client`, for tests that use the service: waits, segmentation under load).
"""

from __future__ import annotations

import io
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from regcl.adapters import AdapterConfig, attach_lora, save_adapter
from regcl.adapters.layout import count_key, gram_key
from regcl.client import ApiConnectionError, Client
from regcl.models.build import SAM_SPECS, build_sam_from_spec

REPO = Path(__file__).resolve().parents[2]
ADMIN_KEY = "test-admin-key-0123456789"
MAX_UPLOAD_BYTES = 2_000_000
STARTUP_TIMEOUT_S = 600.0
PROBLEM_JSON = "application/problem+json"


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ApiServer:
    """``python -m service.app`` in a subprocess; :meth:`start` waits for ``/healthz``."""

    def __init__(self, env: dict[str, str], log_file: Path) -> None:
        self.env = env
        self.port = int(env["REGCL_API_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ApiServer:
        log = open(self.log_file, "ab")  # noqa: SIM115 - the child writes to it
        self.process = subprocess.Popen([sys.executable, "-m", "service.app"], cwd=REPO,
                                        env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with self.api(timeout=2.0) as api:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"API server exited with {self.process.returncode}:\n"
                                       f"{self.log_tail()}")
                try:
                    if api.health():
                        return self
                except ApiConnectionError:
                    pass
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"API server not up after {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (graceful) or SIGKILL, and wait for the exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def client(self, key: str | None = None) -> httpx.Client:
        """A raw HTTP client (for tests of the HTTP contract)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, timeout=120.0, headers=headers)

    def api(self, key: str | None = None, timeout: float = 120.0) -> Client:
        """The library's typed client on this server."""
        return Client(self.url, key, timeout=timeout)

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def server_env(redis_url: str, data_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a test server: its own data dir and port, one torch thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGCL_")}
    env.update({
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "REGCL_REDIS_URL": redis_url,
        "REGCL_DATA_DIR": str(data_dir),
        "REGCL_ARTIFACT_URL": str(data_dir / "artifacts"),
        "REGCL_API_PORT": str(free_tcp_port()),
        "REGCL_ADMIN_KEYS": ADMIN_KEY,
        "REGCL_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "REGCL_EMBEDDING_CACHE_BYTES": str(8 * 2**20),
    })
    env.update(overrides)
    return env


# -- data --------------------------------------------------------------------------------------


def make_image(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    """A few flat rectangles on noise (H x W x 3 uint8), so masks have something to find."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, height - 30), rng.integers(0, width - 40)
        image[y:y + 30, x:x + 40] = rng.integers(80, 255, 3, dtype=np.uint8)
    return image


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_adapter(directory: Path, seed: int, *, stats: bool = True, rank: int = 4,
                 scale: float = 0.15) -> Path:
    """A LoRA adapter for the tiny SAM in PEFT's layout, with random (non-zero) weights, so it
    changes the model's output; ``stats``: with Gram statistics (identity Grams)."""
    torch.manual_seed(0)
    model = attach_lora(build_sam_from_spec(SAM_SPECS["tiny"]), AdapterConfig(rank=rank))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    save_adapter(model, directory, metadata={"seed": seed})
    if stats:
        from safetensors.torch import load_file

        weights = load_file(str(directory / "adapter_model.safetensors"))
        grams = {}
        for key, value in weights.items():
            grams[gram_key(key)] = torch.eye(value.shape[-1])
            grams[count_key(key)] = torch.tensor(16, dtype=torch.int64)
        save_file(grams, str(directory / "regcl_stats.safetensors"))
    return directory


def assert_problem(response: httpx.Response, status: int, code: str) -> dict:
    """The response is an RFC 7807 problem of ``status`` and type ``.../<code>``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body = response.json()
    assert body["type"] == f"https://regcl.dev/problems/{code}", body
    assert body["status"] == status and body["title"]
    return body


def make_zip(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A zip of ``entries`` (name -> bytes) plus symbolic links (name -> target)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buffer.getvalue()


def folder_entries(prefix: str = "", count: int = 3) -> dict[str, bytes]:
    """A folder-pair dataset (images/ + masks/, 64 x 64 PNGs) as zip entries."""
    entries = {}
    for i in range(count):
        image = make_image(20 + i, 64, 64)
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[10:40, 12:50] = 255
        entries[f"{prefix}images/s{i}.png"] = png_bytes(image)
        entries[f"{prefix}masks/s{i}.png"] = png_bytes(mask)
    return entries
