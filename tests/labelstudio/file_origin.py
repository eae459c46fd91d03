"""A plain HTTP server standing in for Label Studio's file serving (``/data/upload/...``) in
the API-level tests: real sockets, real HTTP, on 127.0.0.1, checking the API token as Label
Studio does (``Authorization: Token <key>``, or with :meth:`FileOrigin.personal_tokens` a
personal access token's access tokens, ``Bearer``, made at ``POST /api/token/refresh/``), plus
the misbehaviours a real deployment can show (redirects, slow bodies, oversized bodies,
errors, access tokens refused), and the task list the sync pages through
(:meth:`FileOrigin.task_page`). The end-to-end tests use Label Studio itself
(``test_labelstudio_e2e.py``)."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

TOKEN = "origin-token-0123456789"


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _json(body: object) -> Route:
    return Route(json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def make_jwt(token_type: str, lifetime_s: float) -> str:
    """A JWT of Label Studio's form (its signature is not checked by anyone here)."""
    now = int(time.time())
    return ".".join([_b64({"alg": "HS256", "typ": "JWT"}),
                     _b64({"token_type": token_type, "exp": now + int(lifetime_s), "iat": now,
                           "jti": uuid.uuid4().hex, "user_id": "1"}), "c2lnbmF0dXJl"])


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
        self.pat: str | None = None  # personal access token mode (see personal_tokens)
        self.access: set[str] = set()  # access tokens accepted now
        self.access_lifetime_s = 300.0
        self.refreshes = 0
        self.refresh_delay_s = 0.0
        self.tasks: dict[int, list[dict]] = {}  # project id -> tasks (see task_page)
        self.lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                header = self.headers.get("Authorization") or ""
                origin.requests.append((self.path, header or None))
                allowed = header.removeprefix("Bearer ") in origin.access \
                    if origin.pat is not None else header == f"Token {TOKEN}"
                if not allowed:
                    self._send(Route(b'{"detail": "auth"}', 401))
                    return
                path, _, query = self.path.partition("?")
                if path == "/api/tasks" and origin.has_tasks(query):  # the sync's pages
                    self._send(origin.task_page(query))
                    return
                self._send(origin.routes.get(self.path) or origin.api(self.path)
                           or Route(b"missing", 404))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                origin.requests.append((self.path, self.headers.get("Authorization")))
                if self.path != "/api/token/refresh/" or origin.pat is None:
                    self._send(Route(b"missing", 404))
                    return
                time.sleep(origin.refresh_delay_s)  # lets concurrent callers pile up
                if body.get("refresh") != origin.pat:
                    self._send(Route(b'{"detail": "Token is invalid"}', 401))
                    return
                access = make_jwt("access", origin.access_lifetime_s)
                with origin.lock:
                    origin.refreshes += 1
                    origin.access.add(access)
                self._send(Route(json.dumps({"access": access}).encode(),
                                 headers={"Content-Type": "application/json"}))

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

        self.projects: dict[int, tuple[str, list[dict]]] = {}  # id -> (label config, tasks)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # a connection the client (or the tests' proxy) reset is no error of the origin's
        self.server.handle_error = lambda request, address: None  # type: ignore[method-assign]
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

    def add_project(self, project: int, label_config: str, tasks: list[dict]) -> None:
        """Serve ``/api/projects/<project>`` and the project's ``/api/tasks`` pages (in the
        order of ``tasks``; a page past the last answers 404, as Label Studio's does)."""
        self.projects[project] = (label_config, tasks)

    def api(self, path: str) -> Route | None:
        """Label Studio's project and task-list API over :attr:`projects`, or None."""
        url = urllib.parse.urlsplit(path)
        query = urllib.parse.parse_qs(url.query)
        if url.path.startswith("/api/projects/"):
            found = self.projects.get(int(url.path.rstrip("/").rsplit("/", 1)[-1]))
            return None if found is None else _json({"id": int(url.path.rstrip("/")
                                                                .rsplit("/", 1)[-1]),
                                                     "label_config": found[0]})
        if url.path != "/api/tasks":
            return None
        found = self.projects.get(int(query.get("project", ["-1"])[0]))
        if found is None:
            return None
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["30"])[0])
        tasks = found[1][(page - 1) * size:page * size]
        if page > 1 and not tasks:
            return Route(b'{"detail": "Invalid page."}', 404)
        return _json({"tasks": tasks, "total": len(found[1])})

    def has_tasks(self, query: str) -> bool:
        """Whether ``query`` names a project of :attr:`tasks` (the sync's; the pre-encode's
        are :attr:`projects`)."""
        return int(parse_qs(query).get("project", ["-1"])[0]) in self.tasks

    def task_page(self, query: str) -> Route:
        """``GET /api/tasks`` as the sync asks it of Label Studio: a project's tasks with
        annotations, in id order, past the ``filter:tasks:id greater`` filter of ``query``,
        ``page_size`` of them, with the ``total`` that match."""
        params = parse_qs(query)
        project = int(params["project"][0])
        size = int(params.get("page_size", ["100"])[0])
        items = json.loads(params.get("query", ["{}"])[0]).get("filters", {}).get("items", [])
        after = max([i["value"] for i in items if i.get("filter") == "filter:tasks:id"] or [0])
        chosen = sorted((t for t in self.tasks.get(project, [])
                         if t["id"] > after and t.get("annotations")), key=lambda t: t["id"])
        return Route(json.dumps({"tasks": chosen[:size], "total": len(chosen)}).encode(),
                     headers={"Content-Type": "application/json"})

    def personal_tokens(self, lifetime_s: float = 300.0) -> str:
        """Switch to personal access tokens (legacy tokens refused from now on); returns the
        personal access token (a refresh JWT)."""
        self.pat = make_jwt("refresh", 3600 * 24 * 365)
        self.access_lifetime_s = lifetime_s
        return self.pat

    def revoke_access(self) -> None:
        """Refuse every access token made so far (their holders must refresh)."""
        with self.lock:
            self.access.clear()

    def fetched(self, path: str) -> int:
        """How many times ``path`` was requested."""
        return sum(1 for p, _ in self.requests if p == path)
