"""The webhook ingest queue: annotation events kept in Redis until their masks are stored.

Storing an annotation takes a fetch from Label Studio, a decode and a PNG encode (tens of
milliseconds of CPU for a VGA image, more for larger ones), while Label Studio waits 1 s for a
webhook's answer (``WEBHOOK_TIMEOUT``) and an import or a busy team sends dozens a second. So
an event that cannot be stored at once is **recorded** here and answered ``queued``; a consumer
thread in every API process stores the recorded events, oldest first.

- The queue is a Redis stream (``keys.LS_INGEST``, persisted like every other key), one entry
  per annotation event (a bulk event is split into its annotations), so an API process that
  dies or restarts loses nothing: an entry leaves the stream only after it was handled.
- One **turn** at a time in the whole deployment (a Redis lock with a lease,
  ``keys.LS_INGEST_LOCK``): an event is handled inline (the old synchronous answer, with its
  problems) only when its webhook gets the turn at once *and* nothing is queued, and only for
  ``label_studio_webhook_wait_s``: an inline store that takes longer (a large image) goes on
  holding the turn, while its event is recorded too and answered ``queued`` (the consumer then
  finds it stored: ``unchanged``). Else it is queued. A consumer takes the turn, handles the
  stream's head and deletes it by id, so events are stored in the order they arrived, and an
  entry is deleted once even if a lease lapsed.
- Handling an entry twice (a process died between storing and deleting) stores nothing twice:
  the sample set knows the annotation's version (``updated_at``).
- A handled entry whose event is bad (its image gone, its masks the wrong size) is moved to
  ``keys.LS_INGEST_FAILED`` (the latest :data:`MAX_FAILED`, with the problem) and logged;
  a sync of the project (``POST /labelstudio/sync``) stores what Label Studio has now. Errors
  after which every event would fail (Label Studio unreachable, the token refused, Redis away)
  keep the entry at the head, tried again with a growing pause: nothing is dropped, except
  that an entry whose image Label Studio has not served after :data:`MAX_TRANSIENT_ATTEMPTS`
  tries (a 5xx for this one image would otherwise hold the queue forever) is failed as above.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.exceptions import LockError
from redis.lock import Lock

from infra import keys
from regcl.errors import RegclError

__all__ = ["MAX_ATTEMPTS", "MAX_FAILED", "IngestConsumer", "IngestQueue"]

logger = logging.getLogger(__name__)

MAX_FAILED = 1000
"""Failed entries kept for people to read (older ones are trimmed)."""
MAX_ATTEMPTS = 3
"""Tries of an entry whose handling raised an unexpected error (a bug): then it is failed."""
MAX_TRANSIENT_ATTEMPTS = 8
"""Tries of an entry whose handling met a ``transient`` error (Label Studio unreachable: down,
slow, or a 5xx for this image), about 3 minutes with the growing pause: then it is failed."""
POLL_S = 0.2
MAX_PAUSE_S = 30.0


class IngestQueue:
    """The stream of recorded events and the turn (see the module doc). ``lease_s``: how
    long a turn lasts if its holder dies (longer than the slowest event takes)."""

    def __init__(self, client: redis.Redis, lease_s: float) -> None:
        self._redis = client
        self.lease_s = lease_s

    def backlog(self) -> int:
        """Events recorded and not yet handled."""
        return int(self._redis.xlen(keys.LS_INGEST))

    def push(self, events: list[dict[str, Any]]) -> None:
        """Record ``events`` (JSON objects), in order, in one transaction."""
        pipe = self._redis.pipeline(transaction=True)
        for event in events:
            pipe.xadd(keys.LS_INGEST, {"event": json.dumps(event, allow_nan=False)})
        pipe.execute()

    def take_turn(self, wait_s: float | None) -> Lock | None:
        """The turn, if had (``wait_s``: None, do not wait); give it back with
        :meth:`give_back` (from any thread)."""
        lock = self._redis.lock(keys.LS_INGEST_LOCK, timeout=self.lease_s, thread_local=False,
                                blocking=wait_s is not None, blocking_timeout=wait_s)
        return lock if lock.acquire() else None

    @staticmethod
    def give_back(lock: Lock) -> None:
        with contextlib.suppress(LockError):
            lock.release()

    @contextlib.contextmanager
    def turn(self, wait_s: float | None) -> Iterator[bool]:
        """Hold the turn (``wait_s``: None, do not wait); yields whether it was had."""
        lock = self.take_turn(wait_s)
        try:
            yield lock is not None
        finally:
            if lock is not None:
                self.give_back(lock)

    def head(self) -> tuple[str, dict[str, Any]] | None:
        """The oldest recorded event and its id, or None."""
        found = self._redis.xrange(keys.LS_INGEST, count=1)
        if not found:
            return None
        entry_id, fields = found[0]
        entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        raw = fields.get(b"event", fields.get("event"))
        return entry_id, json.loads(raw)

    def done(self, entry_id: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.xdel(keys.LS_INGEST, entry_id)
        pipe.hdel(keys.LS_INGEST_ATTEMPTS, entry_id)
        pipe.execute()

    def attempt(self, entry_id: str) -> int:
        """Count one more try of ``entry_id``; returns the count."""
        return int(self._redis.hincrby(keys.LS_INGEST_ATTEMPTS, entry_id, 1))

    def fail(self, entry_id: str, event: dict[str, Any], code: str, detail: str) -> None:
        """Move ``entry_id`` to the failed list (with why) and out of the stream."""
        record = {"entry": entry_id, "event": event, "code": code, "detail": detail[:500],
                  "at": time.time()}
        pipe = self._redis.pipeline(transaction=True)
        pipe.lpush(keys.LS_INGEST_FAILED, json.dumps(record, allow_nan=False))
        pipe.ltrim(keys.LS_INGEST_FAILED, 0, MAX_FAILED - 1)
        pipe.xdel(keys.LS_INGEST, entry_id)
        pipe.hdel(keys.LS_INGEST_ATTEMPTS, entry_id)
        pipe.execute()

    def failed(self) -> list[dict[str, Any]]:
        """The failed entries kept, newest first."""
        return [json.loads(r) for r in self._redis.lrange(keys.LS_INGEST_FAILED, 0, -1)]


class IngestConsumer:
    """A thread that handles the queue's head whenever it has the turn. ``handle`` stores one
    event (raising its typed error); ``stopping``: the errors after which every event would
    fail, so the entry stays and is tried again later; ``transient``: those of them after
    which the entry is failed once it was tried :data:`MAX_TRANSIENT_ATTEMPTS` times."""

    def __init__(self, queue: IngestQueue, handle: Callable[[dict[str, Any]], None],
                 stopping: tuple[type[BaseException], ...],
                 transient: tuple[type[BaseException], ...] = ()) -> None:
        self.queue = queue
        self.handle = handle
        self.stopping = stopping
        self.transient = transient
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ls-ingest", daemon=True)

    def start(self) -> IngestConsumer:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        pause = POLL_S
        while not self._stop.is_set():
            try:
                handled = self.step()
                pause = POLL_S
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                    *self.stopping) as exc:
                pause = min(MAX_PAUSE_S, max(1.0, pause * 2))
                logger.warning("ingest queue: paused %.0f s (%s: %s)", pause,
                               type(exc).__name__, exc)
                handled = False
            except Exception:  # a bug: logged, the loop goes on (the entry is counted)
                logger.exception("ingest queue: unexpected error")
                handled = False
                pause = 1.0
            if not handled:
                self._stop.wait(pause)

    def step(self) -> bool:
        """Handle the head if there is one and the turn is had; whether one was handled."""
        if self.queue.backlog() == 0:
            return False
        with self.queue.turn(wait_s=1.0) as had:
            if not had:
                return False
            head = self.queue.head()
            if head is None:
                return False
            entry_id, event = head
            try:
                self.handle(event)
            except self.stopping as exc:
                if isinstance(exc, self.transient) and \
                        self.queue.attempt(entry_id) >= MAX_TRANSIENT_ATTEMPTS:
                    self.queue.fail(entry_id, event, getattr(exc, "code", type(exc).__name__),
                                    str(exc))
                raise  # the entry stays at the head (unless failed just now)
            except RegclError as exc:
                code = getattr(exc, "code", type(exc).__name__)
                logger.warning("ingest queue: event %s not stored (%s: %s)", entry_id, code,
                               exc)
                self.queue.fail(entry_id, event, code, str(exc))
                return True
            except Exception as exc:
                if self.queue.attempt(entry_id) >= MAX_ATTEMPTS:
                    self.queue.fail(entry_id, event, "internal-error",
                                    f"{type(exc).__name__}: {exc}")
                raise
            self.queue.done(entry_id)
            return True
