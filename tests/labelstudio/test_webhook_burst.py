"""Annotation webhooks faster than they can be stored (issue #24, case 4), on the real API
server with a real redis-server and the tests' file origin: a burst at 50 per second is stored
exactly once; events queued behind others keep their order (an update after its creation, a
deletion after its creation, a repeat stores nothing); queued events outlive an API process
killed with SIGKILL. The 1,000-webhook benchmark with its figures is
``scripts/webhook_burst.py`` (docs/reliability.md)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
import redis

from infra import keys
from infra.artifacts import ArtifactStore
from infra.datasets import DatasetRegistry
from infra.redis_client import connect
from infra.redis_server import RedisServer
from infra.sample_sets import SampleSets, default_domain
from service.labelstudio.ingest_queue import IngestQueue
from tests import databases
from tests.labelstudio.burst import make_burst, percentiles, send_open_loop, stored_figures
from tests.labelstudio.file_origin import TOKEN, FileOrigin
from tests.labelstudio.ls_support import annotation_event, brush_region, project_event
from tests.service.api_support import ADMIN_KEY, ApiServer, make_image, png_bytes

logger = logging.getLogger(__name__)

SIZE = (96, 128)
SETTLE_S = 180.0


def _sets(api: ApiServer, client: redis.Redis) -> SampleSets:
    store = ArtifactStore(api.env["REGCL_ARTIFACT_URL"])
    return SampleSets(client, store, DatasetRegistry(client, store))


def _settled(client: redis.Redis) -> None:
    """Wait until the ingest queue is empty and no one holds its turn."""
    deadline = time.monotonic() + SETTLE_S
    while client.xlen(keys.LS_INGEST) or client.exists(keys.LS_INGEST_LOCK):
        assert time.monotonic() < deadline, "the ingest queue did not drain"
        time.sleep(0.1)


@pytest.fixture
def admin(ls_api: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ls_api.url, auth=("labelstudio", ADMIN_KEY),
                      timeout=120) as client:
        yield client


def test_a_burst_of_webhooks_is_stored_exactly_once(ls_api: ApiServer, origin: FileOrigin,
                                                    ls_redis: redis.Redis) -> None:
    project, count = 880, 100
    events = make_burst(origin, project, count, SIZE, first_id=880_000)
    started = time.monotonic()
    answers = send_open_loop(ls_api.url, events, rate=50.0)
    sent_s = time.monotonic() - started
    assert [a.status for a in answers] == [200] * count
    statuses = Counter(a.body["status"] for a in answers if a.body)
    assert set(statuses) <= {"ok", "queued"}
    _settled(ls_redis)
    figures = stored_figures(ls_redis, _sets(ls_api, ls_redis), default_domain(project),
                             [e["annotation"]["id"] for e in events])
    print(f"\n[reliability] burst of {count} webhooks at 50/s: sent in {sent_s:.1f} s, "
          f"answers {dict(statuses)}, {percentiles([a.seconds for a in answers])}; all stored "
          f"{time.monotonic() - started:.1f} s after the first; {figures}")
    assert figures == {"stored": count, "lost": 0, "duplicated": 0, "missing_files": 0}
    assert IngestQueue(ls_redis, 60).failed() == []


def test_queued_events_keep_their_order(ls_api: ApiServer, admin: httpx.Client,
                                        origin: FileOrigin, ls_redis: redis.Redis) -> None:
    project = 881
    paths = [origin.add(f"/data/upload/{project}/q{i}.png", png_bytes(make_image(90 + i, *SIZE)))
             for i in range(5)]
    first, second = np.zeros(SIZE, dtype=bool), np.zeros(SIZE, dtype=bool)
    first[10:40, 10:50] = True
    second[50:90, 60:120] = True

    def event(action: str, annotation: int, path: str, masks: list[np.ndarray],
              version: str) -> dict:
        body = annotation_event(action, project, annotation, annotation + 10, path,
                                [brush_region(m) for m in masks])
        body["annotation"]["updated_at"] = version
        return body

    a1 = event("ANNOTATION_CREATED", 1, paths[0], [first], "2026-12-07T10:00:00Z")
    a2 = event("ANNOTATION_UPDATED", 1, paths[0], [first, second], "2026-12-07T10:05:00Z")
    b = event("ANNOTATION_CREATED", 2, paths[1], [first], "2026-12-07T10:00:00Z")
    c = event("ANNOTATION_CREATED", 3, paths[2], [second], "2026-12-07T10:00:00Z")
    bulk = [event("ANNOTATIONS_CREATED", i, paths[i - 1], [first], "2026-12-07T10:00:00Z")
            for i in (4, 5)]
    queue = IngestQueue(ls_redis, lease_s=60)
    sets = _sets(ls_api, ls_redis)
    domain = default_domain(project)
    with queue.turn(wait_s=10) as had:  # the test holds the turn: every event must queue
        assert had
        answers = [admin.post("/labelstudio/webhook", json=body) for body in (
            a1, a2, b, project_event("ANNOTATIONS_DELETED", project, annotations=[{"id": 2}]),
            c, c, {"action": "ANNOTATIONS_CREATED", "project": bulk[0]["project"],
                   "annotation": [e["annotation"] for e in bulk],
                   "task": [e["task"] for e in bulk]})]
        assert [r.status_code for r in answers] == [200] * 7, [r.text for r in answers]
        bodies = [r.json() for r in answers]
        assert [x["status"] for x in bodies] == ["queued"] * 7
        assert [x["samples"] for x in bodies] == [1, 2, 1, 0, 1, 1, 2]
        assert [x["annotations"] for x in bodies] == [1, 1, 1, 1, 1, 1, 2]
        assert queue.backlog() == 8 and sets.entries(domain) == {}  # recorded, not stored
    _settled(ls_redis)
    entries = sets.entries(domain)
    assert sorted(entries) == [1, 3, 4, 5]  # 2 was deleted after it was created
    assert len(entries[1].masks) == 2  # the update, not the creation
    assert sets.version_of(domain, 1) == "2026-12-07T10:05:00Z"
    log = ls_redis.lrange(keys.samples(domain, "log"), 0, -1)
    assert len(log) == 7  # a1, a2, b, delete b, c once, the bulk's two
    assert queue.failed() == []


def test_queued_events_outlive_a_killed_api(redis_server: RedisServer, origin: FileOrigin,
                                           start_api: Callable[..., ApiServer]) -> None:
    """An API with the default webhook wait (0.3 s): an idle webhook whose image comes slowly
    is answered ``queued`` and stored once. Then webhooks queued (the test holds the turn), the
    API SIGKILLed, a new one started on the same Redis database and data directory: it stores
    every queued event once."""
    redis_url = databases.emptied(redis_server, databases.LABELSTUDIO_QUEUE)
    env = {"REGCL_LABEL_STUDIO_URL": origin.url, "REGCL_LABEL_STUDIO_API_KEY": TOKEN}
    api = start_api(redis_url, **env)
    client = connect(redis_url)
    project, count = 882, 20
    events = make_burst(origin, project, count, SIZE, first_id=882_000)
    queue = IngestQueue(client, lease_s=60)
    try:
        (slow,) = make_burst(origin, 883, 1, SIZE, first_id=883_000)
        origin.routes[slow["task"]["data"]["image"]].drip_s = 0.1  # >= 1 s for its bytes
        with httpx.Client(base_url=api.url, auth=("labelstudio", ADMIN_KEY),
                          timeout=60) as admin:
            answer = admin.post("/labelstudio/webhook", json=slow)
        assert answer.status_code == 200 and answer.json()["status"] == "queued", answer.text
        _settled(client)
        slow_figures = stored_figures(client, _sets(api, client), default_domain(883),
                                      [883_000])
        assert slow_figures == {"stored": 1, "lost": 0, "duplicated": 0, "missing_files": 0}
        assert queue.failed() == []
        with queue.turn(wait_s=10) as had:
            assert had
            with httpx.Client(base_url=api.url, auth=("labelstudio", ADMIN_KEY),
                              timeout=60) as admin:
                statuses = [admin.post("/labelstudio/webhook", json=e).json()["status"]
                            for e in events]
            assert statuses == ["queued"] * count
            api.stop(kill=True)
            assert queue.backlog() == count
            again = start_api(redis_url, data_dir=api.log_file.parent, **env)
        _settled(client)
        figures = stored_figures(client, _sets(again, client), default_domain(project),
                                 [e["annotation"]["id"] for e in events])
        print(f"\n[reliability] an idle webhook with a slow image: answered queued, then "
              f"{slow_figures}; {count} queued webhooks, API killed and restarted: {figures}")
        assert figures == {"stored": count, "lost": 0, "duplicated": 0, "missing_files": 0}
    finally:
        client.close()
