"""Fixtures for tests that need Redis: a REAL redis-server process, no fakes.

Self-contained on purpose (imports only ``infra``), so it can move to ``tests/conftest.py``
when the service and worker tests need the same server.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import redis

from infra.redis_client import connect
from infra.redis_server import RedisServer


def _free_port() -> int:
    """A TCP port that was free a moment ago (RedisServer refuses it if it has been taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1, for tests that run their own RedisServer."""
    return _free_port()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session, persisting into a temporary directory."""
    with RedisServer(tmp_path_factory.mktemp("redis"), _free_port()) as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on the session server, with an empty database for each test."""
    client = connect(redis_server.url)
    client.flushdb()
    yield client
    client.close()
