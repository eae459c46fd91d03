"""Reaching the artifact store when it may be away or slow (issue #24, case 1).

- :data:`UNAVAILABLE`: the errors that mean "the store did not answer" (refused, reset, timed
  out: builtins, botocore, aiohttp, fsspec) rather than "the store said no";
- :func:`call_with_retries`: one store operation tried again with backoff while the store does
  not answer, for up to ``retry_s``, then :class:`~infra.errors.StoreUnavailable`;
- :func:`store_deadline` / :func:`check_deadline`: a caller's time for its store work (the
  API's requests), checked before each request to the store and before any commit;
- :data:`S3_CONFIG`, :data:`S3_RETRIES`: botocore and s3fs each try a request twice (their
  defaults: 5 and 5), so a dead endpoint answers within seconds.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

from infra.errors import StoreUnavailable
from regcl.errors import RegclError

__all__ = ["S3_CONFIG", "S3_RETRIES", "UNAVAILABLE", "call_with_retries", "check_deadline",
           "reaches_store", "store_deadline"]

logger = logging.getLogger(__name__)

S3_CONFIG = {"retries": {"max_attempts": 2, "mode": "standard"}}
S3_RETRIES = 2  # s3fs's own retries of timeouts and broken reads (its default: 5)
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.5, 5.0
T = TypeVar("T")


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.timeout]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
        found += [BotoConnectionError, HTTPClientError]
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError
        found.append(ClientError)
    with contextlib.suppress(ImportError):
        from fsspec.exceptions import FSTimeoutError
        found.append(FSTimeoutError)
    return tuple(found)


UNAVAILABLE = _unavailable_errors()
"""The errors that mean the store did not answer (regcl's own errors never count)."""

_DEADLINE: ContextVar[float | None] = ContextVar("regcl_store_deadline", default=None)


@contextlib.contextmanager
def store_deadline(seconds: float) -> Iterator[None]:
    """Artifact-store work started inside the block (in this context: the thread, or the tasks
    and threads it starts) stops with StoreUnavailable once ``seconds`` have passed, before its
    next request to the store and before any commit, so a slow store cannot hold a caller past
    its own timeout. Nested blocks keep the earlier deadline."""
    current = _DEADLINE.get()
    deadline = time.monotonic() + seconds
    token = _DEADLINE.set(deadline if current is None else min(current, deadline))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_deadline() -> None:
    """StoreUnavailable if the :func:`store_deadline` this runs under has passed."""
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline:
        raise StoreUnavailable("the artifact store is too slow: the request's time for it "
                               "ran out before this operation was done; nothing of it was "
                               "committed")


def call_with_retries(what: str, attempt: Callable[[int], T], retry_s: float) -> T:
    """``attempt(n)`` (n = 1, 2, ...) until it returns, tried again with backoff while the
    store does not answer, for up to ``retry_s`` (and never past a :func:`store_deadline`);
    then StoreUnavailable naming ``what``."""
    start = time.monotonic()
    delay, number = _BACKOFF_FIRST_S, 0
    while True:
        number += 1
        try:
            return attempt(number)
        except RegclError:
            raise
        except UNAVAILABLE as exc:
            elapsed = time.monotonic() - start
            deadline = _DEADLINE.get()
            if elapsed + delay > retry_s or (
                    deadline is not None and time.monotonic() + delay > deadline):
                raise StoreUnavailable(
                    f"the artifact store did not answer ({what}; {number} "
                    f"{'try' if number == 1 else 'tries'} in {elapsed:.1f} s): "
                    f"{type(exc).__name__}: {exc}") from exc
            logger.warning("artifact store unreachable (%s: %s: %s); trying again in %.1f s",
                           what, type(exc).__name__, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)


def reaches_store(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator of a store's method: run it under :func:`call_with_retries` with the
    store's ``retry_s``."""
    def decorate(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
            return call_with_retries(what, lambda _attempt: method(self, *args, **kwargs),
                                     self.retry_s)
        return wrapper
    return decorate
