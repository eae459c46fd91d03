"""Following the live-version pointer: a pub/sub listener thread that survives Redis restarts.

Published messages only wake the listener; the version delivered is always read back from the
``regcl:live`` key, so a late or duplicated message can never move a follower backwards. The
key is also re-read after every (re)connection and every ``resync_interval_s``, which catches
changes published while the connection was down. A version whose callback raised (its files
could not be fetched, say) is not taken as delivered: the callback runs again at each resync
until it succeeds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import redis

from infra import keys

__all__ = ["LiveSubscription", "read_live"]

logger = logging.getLogger(__name__)


def read_live(client: redis.Redis) -> int | None:
    """The live version number, or None if nothing was activated yet."""
    value = client.get(keys.LIVE)
    return None if value is None else int(value)


class LiveSubscription:
    """Calls ``callback(version)`` on a daemon thread each time the live version changes.

    ``deliver_current``: also call it once at start with the current live version (if any).
    Callback errors are logged and do not stop the listener. Call :meth:`stop` to end it.
    """

    def __init__(self, client: redis.Redis, callback: Callable[[int], None], *,
                 deliver_current: bool = True, resync_interval_s: float = 5.0,
                 reconnect_delay_s: float = 0.5) -> None:
        self._redis = client
        self._callback = callback
        self._deliver_current = deliver_current
        self._resync_interval_s = resync_interval_s
        self._reconnect_delay_s = reconnect_delay_s
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._reconnected = threading.Event()
        self._last: int | None = None
        self._failed: int | None = None  # a version whose callback failed (retried)
        self._baseline_taken = False
        self._thread = threading.Thread(target=self._run, name="regcl-live-listener",
                                        daemon=True)

    def start(self) -> LiveSubscription:
        self._thread.start()
        return self

    @property
    def last_version(self) -> int | None:
        """The last version handed to the callback (or taken as the baseline)."""
        return self._last

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until subscribed (and resynced); False on timeout. Cleared while disconnected."""
        return self._ready.wait(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop listening and join the thread."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def __enter__(self) -> LiveSubscription:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _on_reconnect(self, connection: object) -> None:
        logger.info("live-version listener reconnected to Redis; resyncing")
        self._reconnected.set()

    def _resync(self) -> None:
        version = read_live(self._redis)
        if not self._baseline_taken:
            self._baseline_taken = True
            if not self._deliver_current:
                self._last = version
                return
        if version is not None and version != self._last:
            try:
                self._callback(version)
            except Exception:  # e.g. the artifact store unreachable: try again at the resync
                first = version != self._failed
                self._failed = version
                logger.warning("live-version callback failed for version %d; retrying every "
                               "%.0f s", version, self._resync_interval_s, exc_info=first)
                return
            self._last, self._failed = version, None

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.LIVE_CHANNEL)
                # redis-py may reconnect (and resubscribe) inside get_message without telling
                # us; whatever was published meanwhile is lost, so re-read the key after it.
                pubsub.connection.register_connect_callback(self._on_reconnect)
                self._resync()
                self._ready.set()
                failures = 0
                next_resync = time.monotonic() + self._resync_interval_s
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message is not None or self._reconnected.is_set() \
                            or time.monotonic() >= next_resync:
                        self._reconnected.clear()
                        self._resync()
                        next_resync = time.monotonic() + self._resync_interval_s
            except (redis.exceptions.RedisError, OSError) as exc:
                # Warn once per outage, not on every retry.
                log = logger.warning if failures == 0 else logger.debug
                log("live-version listener lost Redis (%s); reconnecting", exc)
                self._ready.clear()
                failures += 1
                self._stop.wait(self._reconnect_delay_s)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
        self._ready.clear()
