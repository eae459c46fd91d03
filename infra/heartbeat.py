"""A daemon thread that renews something (a job lease, the merge lock) while work goes on.

The renewal function returns True while the thing is still ours; once it returns False the
heartbeat stops and :attr:`Heartbeat.lost` is set (the holder should then not commit its work).
Redis errors (a restart, a dropped connection) are logged and retried at the next beat: the
lease only lapses if Redis stays away for longer than the lease.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

import redis
from redis.exceptions import LockError
from redis.lock import Lock

__all__ = ["Heartbeat", "lock_heartbeat"]

logger = logging.getLogger(__name__)


class Heartbeat:
    """Call ``renew()`` every ``interval_s`` on a daemon thread until :meth:`stop`."""

    def __init__(self, renew: Callable[[], bool], interval_s: float, what: str) -> None:
        self._renew = renew
        self.interval_s = interval_s
        self.what = what
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat:{what}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(max(self.interval_s, 1.0) + 5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self._renew():
                    logger.error("%s was lost (expired or taken over); stopping its renewal",
                                 self.what)
                    self.lost.set()
                    return
            except (redis.exceptions.RedisError, OSError) as exc:
                logger.warning("could not renew %s (%s); retrying", self.what, exc)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def lock_heartbeat(lock: Lock, lease_s: float, what: str) -> Heartbeat:
    """A started heartbeat that keeps the held Redis ``lock`` leased (``lease_s``, renewed every
    third of it); it stops, with ``lost`` set, once the lock is no longer ours."""

    def renew() -> bool:
        try:
            lock.reacquire()
        except LockError:
            return False
        return True

    return Heartbeat(renew, lease_s / 3.0, what).start()
