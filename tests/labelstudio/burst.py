"""A burst of annotation webhooks at a steady rate while annotators keep clicking, over real
HTTP against a running API whose Label Studio is a :class:`FileOrigin` (issue #24, case 4).

Used by ``scripts/webhook_burst.py`` (the opt-in benchmark: 1,000 webhooks at 50/s, figures as
JSON) and by ``tests/labelstudio/test_webhook_burst.py`` (a small burst, no timing asserts).

- :func:`make_burst`: ``count`` ANNOTATION_CREATED webhooks, each for its own task with its own
  JPEG image on the origin and one brush mask, with Label Studio's ``updated_at``.
- :func:`send_open_loop`: each webhook sent at its scheduled instant (``i / rate`` after the
  start) from a pool of sender threads, whatever the answers before it took, as Label Studio's
  users and imports do; each answer's status and seconds from its send.
- :class:`Clickers`: annotator threads posting ``/labelstudio/predict`` (a few clicks per image,
  then the next image, which the engine must encode), each click's start and seconds.
- :func:`stored_figures`: what the project's sample set holds afterwards (stored, duplicated,
  lost, files present).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
import redis
from PIL import Image

from infra import keys
from infra.sample_sets import SampleSets
from tests.labelstudio.file_origin import FileOrigin
from tests.labelstudio.ls_support import annotation_event, brush_region, keypoint, predict_body
from tests.service.api_support import ADMIN_KEY, make_image

__all__ = ["Answer", "Clickers", "make_burst", "percentiles", "send_open_loop",
           "stored_figures", "wait_stored"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """One request: when it was sent (monotonic s), its status (0: no answer) and seconds."""

    sent: float
    status: int
    seconds: float
    body: dict | None = None


def percentiles(seconds: Sequence[float]) -> dict[str, float | int]:
    """n, p50, p99 and max of ``seconds``, in milliseconds (nearest-rank percentiles)."""
    if not seconds:
        return {"n": 0}
    ordered = sorted(seconds)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(np.ceil(q * len(ordered))) - 1))]

    return {"n": len(ordered), "p50_ms": round(rank(0.50) * 1000, 1),
            "p99_ms": round(rank(0.99) * 1000, 1), "max_ms": round(ordered[-1] * 1000, 1)}


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_burst(origin: FileOrigin, project: int, count: int, size: tuple[int, int],
               first_id: int = 1) -> list[dict]:
    """``count`` ANNOTATION_CREATED webhooks of ``project``: annotation ``first_id + i`` on
    task ``first_id + i``, whose ``size`` (height, width) JPEG the origin serves."""
    height, width = size
    events = []
    for i in range(count):
        ident = first_id + i
        path = origin.add(f"/data/upload/{project}/burst-{ident}.jpg",
                          _jpeg(make_image(ident, height, width)))
        mask = np.zeros(size, dtype=bool)
        top, left = ident % (height // 2), (7 * ident) % (width // 2)
        mask[top:top + height // 3, left:left + width // 3] = True
        event = annotation_event("ANNOTATION_CREATED", project, ident, ident, path,
                                 [brush_region(mask)])
        event["annotation"]["updated_at"] = f"2026-12-07T12:00:00.{ident:06d}Z"
        events.append(event)
    return events


def send_open_loop(url: str, events: Sequence[dict], rate: float, senders: int = 64,
                   timeout_s: float = 60.0) -> list[Answer]:
    """POST each event to ``url``/labelstudio/webhook at ``start + i / rate`` (admin key as
    Label Studio sends it, basic auth), from ``senders`` threads; the answers in order."""
    answers: list[Answer | None] = [None] * len(events)
    limits = httpx.Limits(max_connections=senders, max_keepalive_connections=senders)
    with httpx.Client(base_url=url, timeout=timeout_s, limits=limits,
                      auth=httpx.BasicAuth("labelstudio", ADMIN_KEY)) as client:

        def send(i: int) -> None:
            sent = time.monotonic()
            try:
                response = client.post("/labelstudio/webhook", json=events[i])
                body = response.json() if response.status_code == 200 else None
                answers[i] = Answer(sent, response.status_code, time.monotonic() - sent, body)
            except httpx.HTTPError as exc:
                logger.warning("webhook %d: no answer (%s)", i, exc)
                answers[i] = Answer(sent, 0, time.monotonic() - sent)

        with ThreadPoolExecutor(senders) as pool:
            start = time.monotonic()
            for i in range(len(events)):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(send, i)
    return [a for a in answers if a is not None]


@dataclass
class Clickers:
    """``count`` annotators on ``url``: each posts ``clicks_per_image`` predictions (one
    keypoint each, ``think_s`` apart) on an image, then goes on to its next image."""

    url: str
    paths: Sequence[Sequence[str]]  # per annotator, the images it works through
    clicks_per_image: int = 5
    think_s: float = 0.2
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Clickers:
        for k, paths in enumerate(self.paths):
            thread = threading.Thread(target=self._annotate, args=(k, paths), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        return sorted(self.answers, key=lambda a: a.sent)

    def _annotate(self, k: int, paths: Sequence[str]) -> None:
        rng = np.random.default_rng(k)
        with httpx.Client(base_url=self.url, timeout=60.0) as client:
            click = 0
            while not self._stop.is_set():
                path = paths[(click // self.clicks_per_image) % len(paths)]
                x, y = rng.uniform(20, 80, 2)
                body = predict_body([{"id": 10_000_000 + k, "data": {"image": path}}],
                                    [keypoint(float(x), float(y))])
                sent = time.monotonic()
                try:
                    status = client.post("/labelstudio/predict", json=body).status_code
                except httpx.HTTPError:
                    status = 0
                self.answers.append(Answer(sent, status, time.monotonic() - sent))
                click += 1
                self._stop.wait(self.think_s)


def wait_stored(client: redis.Redis, domain: str, count: int, timeout_s: float
                ) -> float | None:
    """Seconds until the domain's log holds ``count`` entries (None: not within
    ``timeout_s``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if int(client.llen(keys.samples(domain, "log"))) >= count:
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def stored_figures(client: redis.Redis, sets: SampleSets, domain: str,
                   annotations: Sequence[int]) -> dict:
    """stored (annotations the set holds of ``annotations``), lost, duplicated (log entries
    beyond one per annotation), missing_files (blobs a held entry names that are absent)."""
    entries = sets.entries(domain)
    log_length = int(client.llen(keys.samples(domain, "log")))
    held = [a for a in annotations if a in entries and entries[a].masks]
    missing = sum(not sets.store.exists(key) for a in held
                  for key in (entries[a].image, *entries[a].masks))
    return {"stored": len(held), "lost": len(annotations) - len(held),
            "duplicated": log_length - len(entries), "missing_files": missing}
