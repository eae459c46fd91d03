"""One way to open a Redis client, so the service, the workers and the tests agree on options."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

__all__ = ["connect", "connect_async"]


def connect(url: str, **kwargs: object) -> redis.Redis:
    """A client for ``url`` that decodes replies to ``str`` and retries dropped connections.

    The stores in :mod:`infra` accept any client, but this is the one they are tested with.
    """
    options: dict[str, object] = {
        "decode_responses": True,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3),
        "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    }
    options.update(kwargs)
    return redis.Redis.from_url(url, **options)  # type: ignore[arg-type]


def connect_async(url: str) -> aioredis.Redis:
    """An asyncio client for ``url`` (the API's server-sent events), decoding replies."""
    return aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5.0,
                                   health_check_interval=30)
