"""Every request's artifact-store work ends before its client gives up (issue #24, case 1).

:class:`StoreDeadlineMiddleware` runs each HTTP request under
:func:`infra.artifacts.store_deadline` (``settings.api_store_deadline_s``): on a store that
answers slowly, an upload, an activation or a download that has not finished its store work by
then stops before its next request to the store and before any commit, and the request is
answered 503 ``store-unavailable`` with ``Retry-After`` (nothing of it is kept). Without it a
store that answers each request in 2 s would hold an adapter upload for about a minute, past
common proxy and client timeouts, and then perhaps commit what the client already took for a
failure. Background work (the live follower, Label Studio jobs, workers) has no such deadline.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from infra.store_reach import store_deadline

__all__ = ["StoreDeadlineMiddleware"]


class StoreDeadlineMiddleware:
    """Runs each HTTP request under a store deadline of ``seconds``."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with store_deadline(self.seconds):  # copied into the route's worker thread
            await self.app(scope, receive, send)
