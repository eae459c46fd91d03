"""A plain HTTP server standing in for Label Studio's file serving (``/data/upload/...``) in
the API-level tests: real sockets, real HTTP, on 127.0.0.1, checking the API token as Label
Studio does (``Authorization: Token <key>``), plus the misbehaviours a real deployment can show
(redirects, slow bodies, oversized bodies, errors). The end-to-end test uses Label Studio
itself (``test_labelstudio_e2e.py``)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "origin-token-0123456789"


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    drip_s: float = 0.0  # pause between 1 KiB chunks (a slow server)
    chunked: bool = False  # no Content-Length


class FileOrigin:
    """Serve ``routes`` (path with query → :class:`Route`); log every request."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization)
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                origin.requests.append((self.path, self.headers.get("Authorization")))
                if self.headers.get("Authorization") != f"Token {TOKEN}":
                    self._send(Route(b"auth", 401))
                    return
                self._send(origin.routes.get(self.path, Route(b"missing", 404)))

            def _send(self, route: Route) -> None:
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                try:
                    for start in range(0, len(route.body), 1024):
                        piece = route.body[start:start + 1024]
                        if route.chunked:
                            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                        else:
                            self.wfile.write(piece)
                        self.wfile.flush()
                        if route.drip_s:
                            time.sleep(route.drip_s)
                    if route.chunked:
                        self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (what a bounded fetch does)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FileOrigin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, path: str, body: bytes, **route: object) -> str:
        """Serve ``body`` at ``path``; returns the path (what a task's data holds)."""
        self.routes[path] = Route(body, **route)  # type: ignore[arg-type]
        return path

    def fetched(self, path: str) -> int:
        """How many times ``path`` was requested."""
        return sum(1 for p, _ in self.requests if p == path)
