"""Fixtures of the HTTP API tests: the REAL server in a subprocess (see ``api_support``),
talking to the real redis-server of ``tests/conftest.py``; clients are httpx.

The server fixtures (``api``, ``start_api``) live in tests/conftest.py, so that every directory
(tests/service, tests/badinput, ...) shares the one session server.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import redis

from tests.service.api_support import ADMIN_KEY, ApiServer


@pytest.fixture
def anon(api: ApiServer, redis_client: redis.Redis) -> Iterator[httpx.Client]:
    """A client without a key on the shared server (its Redis database emptied first)."""
    with api.client() as client:
        yield client


@pytest.fixture
def admin(api: ApiServer, redis_client: redis.Redis) -> Iterator[httpx.Client]:
    """A client with the admin key on the shared server (its Redis database emptied first)."""
    with api.client(ADMIN_KEY) as client:
        yield client


