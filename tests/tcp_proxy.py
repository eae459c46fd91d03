"""A small TCP proxy of the tests' own, in front of a real server (Label Studio, the S3
endpoint), to make it slow or absent while everything else stays real (issue #24, cases 1
and 3).

- :meth:`TcpProxy.down`: every open connection is cut (reset) and the port stops listening,
  so new connections are refused, as when the server's process or host is down;
  :meth:`TcpProxy.up` listens again on the same port.
- ``delay_s``: each piece of the server's answer is held that long before it is passed on
  (a slow or overloaded server; a large answer pays it per 64 KiB piece).
- ``latency_s``: the first piece of each answer (the first after the client sent something)
  is held that long: every request/answer exchange takes that much longer, whatever its size
  (a distant or throttled object store: "2 s per request").

Bytes are forwarded unchanged in both directions, one thread per direction and connection.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time

__all__ = ["TcpProxy"]

logger = logging.getLogger(__name__)

_CHUNK = 65536


class TcpProxy:
    """Listen on 127.0.0.1 (a free port), forward to ``target_port`` on 127.0.0.1."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay_s = 0.0
        self.latency_s = 0.0
        self.accepted = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.port = self._listen(0)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _listen(self, port: int) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return listener.getsockname()[1]

    def up(self) -> None:
        """Listen again (on the same port)."""
        if self._listener is None:
            self._listen(self.port)

    def down(self) -> None:
        """Refuse new connections and reset every open one."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            with contextlib.suppress(OSError):  # RST, not FIN: the peer sees a reset
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), 10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.accepted += 1
                self._open.update((client, upstream))
            asked = threading.Event()  # the client sent something not yet answered
            threading.Thread(target=self._pipe, args=(client, upstream, False, asked),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True, asked),
                             daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, answer: bool,
              asked: threading.Event) -> None:
        """Copy ``source`` to ``sink`` until either end closes; ``answer``: this is the
        server's direction, delayed by ``delay_s`` per piece and ``latency_s`` per exchange."""
        try:
            while data := source.recv(_CHUNK):
                if not answer:
                    asked.set()
                else:
                    pause = self.delay_s
                    if asked.is_set():
                        asked.clear()
                        pause += self.latency_s
                    if pause:
                        time.sleep(pause)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            source.close()
