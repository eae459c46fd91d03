"""Label Studio itself (``label-studio start``, from ``.venv-labelstudio``) in a subprocess for
the end-to-end tests: SQLite and uploads in a temporary folder, a user (with a legacy token,
which Label Studio refuses unless legacy tokens are enabled: its default is off), localhost
allowed as ML backend and webhook target (Label Studio blocks local addresses by default:
ML_BLOCK_LOCAL_IP, SSRF_PROTECTION_ENABLED), webhooks waiting Label Studio's default 1 s
for regcl (``WEBHOOK_TIMEOUT`` unset), no telemetry; plus a client for its REST API logged
in as that user (a session, as the browser has), with which a test creates a personal access token
(:meth:`LabelStudio.create_personal_access_token`) or enables legacy tokens
(:meth:`LabelStudio.enable_legacy_tokens`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_tcp_port
from tests.labelstudio.ls_support import LS_BIN, ls_python

USER = "regcl@example.com"
PASSWORD = "regcl-e2e-password"
TOKEN = "5e2e0123456789abcdef0123456789abcdef0123"
START_TIMEOUT_S = 600.0


class LabelStudio:
    """``label-studio start`` on a free port; :meth:`start` waits for ``/health``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "labelstudio.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, legacy_tokens: bool = False) -> LabelStudio:
        """Start it with its defaults (``legacy_tokens``: with ``--enable-legacy-api-token``)."""
        ls_python()  # fails clearly if the venv is missing
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("REGCL_", "PYTHON", "DJANGO"))}
        env.update({"ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false",
                    "COLLECT_ANALYTICS": "false",
                    "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
                    "OMP_NUM_THREADS": "1"})
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [str(LS_BIN), "start", "--no-browser", "--port", str(self.port),
                 "--data-dir", str(self.data_dir / "data"), "--username", USER,
                 "--password", PASSWORD, "--user-token", TOKEN,
                 *(["--enable-legacy-api-token"] if legacy_tokens else [])],
                env=env, cwd=self.data_dir, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Label Studio exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"Label Studio not up after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # its own session: it and its children
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    @contextlib.contextmanager
    def client(self) -> Iterator[httpx.Client]:
        """Its REST API as the user, logged in (a session cookie and its CSRF token)."""
        with httpx.Client(base_url=self.url, timeout=120) as client:
            yield self._log_in(client)

    def _log_in(self, client: httpx.Client) -> httpx.Client:
        page = client.get("/user/login/")
        assert page.status_code == 200, page.text[:500]
        login = client.post("/user/login/", data={
            "email": USER, "password": PASSWORD, "persist_session": "on",
            "csrfmiddlewaretoken": client.cookies["csrftoken"]},
            headers={"Referer": f"{self.url}/user/login/"})
        assert login.status_code in (200, 302) and "sessionid" in client.cookies, login.text[:500]
        client.headers.update({"X-CSRFToken": client.cookies["csrftoken"],
                               "Referer": f"{self.url}/"})
        return client

    def create_personal_access_token(self) -> str:
        """A personal access token of the user, made through Label Studio's API."""
        with self.client() as client:
            return ok(client.post("/api/token/"), 201)["token"]

    def enable_legacy_tokens(self, enabled: bool = True) -> None:
        """The organisation's setting (Organization → API tokens) that lets legacy tokens in."""
        with self.client() as client:
            settings = ok(client.get("/api/jwt/settings"))
            ok(client.post("/api/jwt/settings", json={**settings,
                                                      "legacy_api_tokens_enabled": enabled}))

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def ok(response: httpx.Response, status: int = 200) -> Any:
    """The JSON of a Label Studio answer that must have ``status``."""
    assert response.status_code == status, (response.request.url, response.text[:2000])
    return response.json()
