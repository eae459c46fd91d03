"""Dynamic batching: requests from many threads, run together by one thread.

Request threads :meth:`~Batcher.submit` an item and wait on its future. One daemon thread
takes the first waiting item, then keeps collecting until it holds ``max_batch`` items or
``max_wait_s`` has passed since that first item, and hands the batch to ``run_batch``, which
must settle every item's future (result or exception). Under load the queue fills while a
batch runs, so batches form without waiting; an idle engine pays at most ``max_wait_s``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from regcl.errors import ConfigError

__all__ = ["BatchStats", "Batcher", "Pending", "WriterFirstLock"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Pending(Generic[T]):
    """One submitted item and the future its submitter waits on."""

    item: T
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    largest: int = 0


class Batcher(Generic[T]):
    """Collects submitted items into batches for ``run_batch`` (see the module docstring).

    Args:
        run_batch: called on the batcher thread with 1..max_batch pending items; it must set
            a result or an exception on each future. If it raises, every future it left
            unsettled gets that exception.
        max_batch: most items in a batch. max_wait_s: longest wait for more items after the
            first one.
    """

    def __init__(self, run_batch: Callable[[list[Pending[T]]], None], *, max_batch: int,
                 max_wait_s: float, name: str = "batcher") -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ConfigError(f"need max_batch >= 1 and max_wait_s >= 0, got {max_batch}, "
                              f"{max_wait_s}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._run_batch = run_batch
        self._queue: queue.SimpleQueue[Pending[T] | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self.in_flight = 0  # items submitted and not yet settled
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future:
        """Queue ``item``; the returned future settles when its batch has run."""
        pending = Pending(item)
        with self._lock:  # no item slips in after close's sentinel
            if self._closed.is_set():
                raise RuntimeError("the batcher is closed")
            self.in_flight += 1
            self._queue.put(pending)
        return pending.future

    def run(self, item: T) -> object:
        """Submit ``item`` and wait for its result (re-raises its exception)."""
        return self.submit(item).result()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread after the items already queued have run."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            self._queue.put(None)
        self._thread.join(timeout_s)

    def _collect(self, first: Pending[T]) -> tuple[list[Pending[T]], bool]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:  # take what is queued already without waiting
                nxt = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            try:
                self._run_batch(batch)
            except BaseException as exc:  # settle everyone; the thread lives on
                logger.exception("batch of %d failed", len(batch))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
            for pending in batch:  # a run_batch that forgot one must not hang its caller
                if not pending.future.done():
                    pending.future.set_exception(RuntimeError("batch item left unsettled"))
            with self._lock:
                self.in_flight -= len(batch)


class WriterFirstLock:
    """A mutex whose ``with lock:`` holders (adapter changes) go before the next
    :meth:`after_writers` holder (the batcher's next batch).

    A plain lock is unfair: under steady load the batcher thread releases it and takes it
    again at once for the next batch, so a hot swap could wait for a pause in the traffic.
    Here a batch waits while any writer is waiting, so a swap waits for one batch at most.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._writers = 0

    def __enter__(self) -> WriterFirstLock:
        with self._changed:
            self._writers += 1
        try:
            self._lock.acquire()
        finally:
            with self._changed:
                self._writers -= 1
                self._changed.notify_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    @property
    def waiting_writers(self) -> int:
        """How many ``with lock:`` holders are waiting for the lock now."""
        with self._changed:
            return self._writers

    @contextlib.contextmanager
    def after_writers(self) -> Iterator[None]:
        """Hold the lock once no writer is waiting for it."""
        with self._changed:
            while self._writers:
                self._changed.wait()
        with self._lock:
            yield
