"""A TCP proxy in front of the S3 endpoint that can freeze one upload: a network stall placed
exactly, so a test can kill a worker while it is in the middle of writing an artifact.

Bytes pass through unchanged in both directions. Once :meth:`StallProxy.arm` is given a
pattern, the first connection whose request stream matches it stops being forwarded (the
client then waits for an answer that never comes) and :attr:`StallProxy.stalled` is set.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading

_TAIL = 512  # bytes of the previous chunk kept, so a pattern split across reads still matches


class StallProxy:
    """127.0.0.1:<port> → 127.0.0.1:<upstream_port>."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stalled = threading.Event()
        self.matched = b""
        self._pattern: re.Pattern[bytes] | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, pattern: bytes) -> None:
        """Stall the next connection whose request bytes match the regex ``pattern``."""
        with self._lock:
            self._pattern = re.compile(pattern)
            self.stalled.clear()

    def _take(self, data: bytes) -> bool:
        """True if ``data`` matches the armed pattern (which is then disarmed)."""
        with self._lock:
            if self._pattern is None:
                return False
            found = self._pattern.search(data)
            if found is None:
                return False
            self._pattern, self.matched = None, found.group(0)
        self.stalled.set()
        return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._sockets += [client, upstream]
            frozen = threading.Event()
            threading.Thread(target=self._pump, args=(client, upstream, frozen, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, frozen, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, frozen: threading.Event,
              requests: bool) -> None:
        tail = b""
        try:
            while chunk := src.recv(65536):
                if requests and not frozen.is_set() and self._take(tail + chunk):
                    frozen.set()
                if frozen.is_set():
                    continue  # swallow: the stalled connection never progresses again
                dst.sendall(chunk)
                tail = (tail + chunk)[-_TAIL:]
        except OSError:
            pass
        finally:
            if not frozen.is_set():
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
