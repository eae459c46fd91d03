"""The embedded redis-server: start, persistence across restarts, clear failures."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from infra.errors import Conflict, RedisServerError
from infra.redis_server import RedisServer, find_redis_server


def test_fixture_server_is_real_and_persistent(redis_server: RedisServer) -> None:
    client = redis_server.client()
    assert client.ping()
    assert int(client.info("server")["process_id"]) == redis_server.pid
    config = client.config_get("*")
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["save"]  # RDB snapshots on as well
    assert Path(config["dir"]) == redis_server.data_dir
    assert config["bind"] == "127.0.0.1"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"


def test_data_survives_a_restart(tmp_path: Path, free_port: int) -> None:
    port = free_port
    with RedisServer(tmp_path, port) as server:
        client = server.client()
        client.set("regcl:test:answer", "42")
        client.hset("regcl:test:hash", mapping={"a": "1", "b": "2"})
        first_pid = server.pid
    assert not server.running
    assert (tmp_path / "dump.rdb").is_file()
    with RedisServer(tmp_path, port) as server:
        assert server.pid != first_pid
        client = server.client()
        assert client.get("regcl:test:answer") == "42"
        assert client.hgetall("regcl:test:hash") == {"a": "1", "b": "2"}


def test_data_survives_a_crash_through_the_aof(tmp_path: Path, free_port: int) -> None:
    """SIGKILL: no SHUTDOWN SAVE, no RDB; only the append-only file can bring the key back."""
    port = free_port
    server = RedisServer(tmp_path, port).start()
    try:
        server.client().set("regcl:test:crash", "kept")
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
    finally:
        server.stop()
    assert not (tmp_path / "dump.rdb").exists()
    with RedisServer(tmp_path, port) as server:
        assert server.client().get("regcl:test:crash") == "kept"


def test_port_in_use_is_refused(redis_server: RedisServer, tmp_path: Path) -> None:
    with pytest.raises(Conflict, match="already in use"):
        RedisServer(tmp_path, redis_server.port).start()
    assert redis_server.client().ping()  # the running one is untouched


def test_a_server_that_cannot_start_says_why(tmp_path: Path, free_port: int) -> None:
    server = RedisServer(tmp_path, free_port, binary="/bin/false")
    with pytest.raises(RedisServerError, match="exited with code 1"):
        server.start()
    assert not server.running


def test_finds_an_executable_binary() -> None:
    binary = find_redis_server()
    assert binary.name == "redis-server" and os.access(binary, os.X_OK)


def test_stop_is_idempotent(tmp_path: Path, free_port: int) -> None:
    server = RedisServer(tmp_path, free_port).start()
    server.stop()
    server.stop()
    assert not server.running and server.pid is None
