"""The task images' origin: a threaded stdlib HTTP server standing in for Label Studio's file
serving (``/data/upload/<project>/<n>.png``). It ignores the API token the backend sends."""

from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["ImageOrigin"]


class ImageOrigin:
    """Serve PNG bytes by path on 127.0.0.1 (a free port); a context manager."""

    def __init__(self) -> None:
        self.images: dict[str, bytes] = {}
        self.fetches = 0
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                body = origin.images.get(self.path.split("?", 1)[0])
                origin.fetches += 1
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "image/png" if body else "text/plain")
                payload = body if body is not None else b"missing"
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(payload)  # the client gave up

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="campaign-origin")

    def __enter__(self) -> ImageOrigin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, path: str, png: bytes) -> str:
        """Serve ``png`` at ``path``; returns the path (what a task's ``data.image`` holds)."""
        self.images[path] = png
        return path
