"""Label Studio down or slow (issue #24, case 3), on the real API server whose Label Studio
(the tests' file origin) sits behind the tests' TCP proxy: predictions answer a clear problem
(502 ``label-studio-unreachable``) within the fetch timeout, and work again once it is back; a
webhook whose image cannot be fetched is queued and stored once Label Studio is back; a sync
cut off half-way fails resumable and the next sync goes on from the last task done, storing
every annotation once."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable

import httpx
import numpy as np
import redis

from infra import keys
from infra.artifacts import ArtifactStore
from infra.datasets import DatasetRegistry
from infra.jobs import JobStore
from infra.sample_sets import SampleSets, default_domain
from tests.labelstudio.file_origin import FileOrigin
from tests.labelstudio.ls_support import (
    LABEL_CONFIG,
    annotation_event,
    brush_region,
    keypoint,
    predict_body,
    task,
)
from tests.service.api_support import ApiServer, assert_problem, make_image, png_bytes
from tests.tcp_proxy import TcpProxy

FETCH_TIMEOUT_S = 2.0  # the ls_api fixture's REGCL_LABEL_STUDIO_FETCH_TIMEOUT_S
SIZE = (96, 128)


def _say(message: str) -> None:
    print(f"\n[reliability] {message}", flush=True)


def _image(origin: FileOrigin, project: int, name: str, seed: int) -> str:
    return origin.add(f"/data/upload/{project}/{name}.png", png_bytes(make_image(seed, *SIZE)))


def _predict(client: httpx.Client, path: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    answer = client.post("/labelstudio/predict", json=predict_body([task(1, path)],
                                                                    [keypoint(40, 50)]))
    return answer, time.monotonic() - started


def test_predict_while_label_studio_is_down_or_slow(ls_anon: httpx.Client, ls_proxy: TcpProxy,
                                                    origin: FileOrigin) -> None:
    warm = _image(origin, 890, "warm", 1)
    cold = [_image(origin, 890, f"cold{i}", 10 + i) for i in range(4)]
    assert _predict(ls_anon, warm)[0].status_code == 200
    answers: Counter[str] = Counter()
    seconds: dict[str, list[float]] = {"down": [], "slow": []}
    ls_proxy.down()
    try:
        for path in cold[:2]:
            answer, took = _predict(ls_anon, path)
            assert_problem(answer, 502, "label-studio-unreachable")
            answers["down: 502 label-studio-unreachable"] += 1
            seconds["down"].append(took)
        answer, _ = _predict(ls_anon, warm)  # the engine still holds it: no fetch needed
        assert answer.status_code == 200, answer.text
        answers["down, image already held: 200"] += 1
    finally:
        ls_proxy.up()
    ls_proxy.delay_s = FETCH_TIMEOUT_S + 1.0
    try:
        for path in cold[2:]:
            answer, took = _predict(ls_anon, path)
            body = assert_problem(answer, 502, "label-studio-unreachable")
            assert "longer than 2 s" in body["detail"], body
            answers["slow: 502 label-studio-unreachable"] += 1
            seconds["slow"].append(took)
    finally:
        ls_proxy.delay_s = 0.0
    for path in cold:
        answer, _ = _predict(ls_anon, path)
        assert answer.status_code == 200, answer.text
        answers["back: 200"] += 1
    _say(f"predict with Label Studio down / {FETCH_TIMEOUT_S + 1:g} s slow (fetch timeout "
         f"{FETCH_TIMEOUT_S:g} s): {dict(answers)}; seconds to the problem: down "
         f"{[round(s, 2) for s in seconds['down']]}, slow {[round(s, 2) for s in seconds['slow']]}")


def _sets(api: ApiServer, client: redis.Redis) -> SampleSets:
    store = ArtifactStore(api.env["REGCL_ARTIFACT_URL"])
    return SampleSets(client, store, DatasetRegistry(client, store))


def _wait(predicate: Callable[[], bool], what: str, timeout_s: float = 120.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_webhook_while_label_studio_is_down_is_queued_then_stored(
        ls_api: ApiServer, ls_admin: httpx.Client, ls_proxy: TcpProxy, origin: FileOrigin,
        ls_redis: redis.Redis) -> None:
    project = 891
    mask = np.zeros(SIZE, dtype=bool)
    mask[10:50, 20:80] = True
    event = annotation_event("ANNOTATION_CREATED", project, 8910, 89100,
                             _image(origin, project, "hook", 30), [brush_region(mask)])
    event["annotation"]["updated_at"] = "2026-12-07T12:00:00Z"
    domain = default_domain(project)
    ls_proxy.down()
    try:
        answer = ls_admin.post("/labelstudio/webhook", json=event)
        assert answer.status_code == 200 and answer.json()["status"] == "queued", answer.text
        time.sleep(1.5)  # the consumer tries, Label Studio is still away: the event stays
        assert ls_redis.xlen(keys.LS_INGEST) == 1
        assert _sets(ls_api, ls_redis).entries(domain) == {}
    finally:
        ls_proxy.up()
    waited = _wait(lambda: ls_redis.xlen(keys.LS_INGEST) == 0, "the queued webhook")
    assert list(_sets(ls_api, ls_redis).entries(domain)) == [8910]
    assert ls_redis.llen(keys.samples(domain, "log")) == 1
    _say(f"a webhook while Label Studio was down: 200 queued; stored {waited:.1f} s after it "
         "came back (once)")


def test_a_sync_cut_off_by_label_studio_resumes_where_it_stopped(
        ls_api: ApiServer, ls_admin: httpx.Client, ls_proxy: TcpProxy, origin: FileOrigin,
        ls_redis: redis.Redis) -> None:
    project, count = 892, 30
    mask = np.zeros(SIZE, dtype=bool)
    mask[20:60, 30:90] = True
    origin.add(f"/api/projects/{project}", json.dumps(
        {"id": project, "label_config": LABEL_CONFIG}).encode(),
        headers={"Content-Type": "application/json"})
    tasks = []
    for i in range(count):
        ident = 892_000 + i
        event = annotation_event("ANNOTATION_CREATED", project, ident, ident,
                                 _image(origin, project, f"sync{i}", 100 + i),
                                 [brush_region(mask)])
        event["annotation"]["updated_at"] = "2026-12-07T12:00:00Z"
        tasks.append({**event["task"], "annotations": [event["annotation"]]})
    origin.tasks[project] = tasks
    jobs, cursor_key = JobStore(ls_redis), keys.ls_sync(project)
    domain = default_domain(project)

    def cursor() -> int:
        return int(ls_redis.hget(cursor_key, "cursor") or 0)

    ls_proxy.delay_s = 0.05  # a little slow, so the test can cut it off half-way
    try:
        first = ls_admin.post("/labelstudio/sync", json={"project": project})
        assert first.status_code == 202, first.text
        _wait(lambda: cursor() >= 892_010, "ten tasks synced")
        ls_proxy.down()
        try:
            _wait(lambda: jobs.get(first.json()["job"]).finished, "the sync to stop")
        finally:
            ls_proxy.up()
            ls_proxy.delay_s = 0.0
    finally:
        ls_proxy.delay_s = 0.0
    stopped = jobs.get(first.json()["job"])
    assert stopped.state.value == "failed", stopped
    assert stopped.error is not None and stopped.error.type == "LabelStudioUnreachableError"
    kept, stored_before = cursor(), len(_sets(ls_api, ls_redis).entries(domain))
    assert 892_010 <= kept < 892_000 + count - 1
    assert stored_before == kept - 892_000 + 1
    second = ls_admin.post("/labelstudio/sync", json={"project": project})
    assert second.status_code == 202, second.text
    _wait(lambda: jobs.get(second.json()["job"]).finished, "the second sync")
    done = jobs.get(second.json()["job"])
    assert done.state.value == "succeeded", done
    result = done.result or {}
    assert result["resumed_from_task"] == kept
    assert result["stored"] == count - stored_before and result["tasks"] == result["stored"]
    entries = _sets(ls_api, ls_redis).entries(domain)
    assert sorted(entries) == [t["id"] for t in tasks]
    assert ls_redis.llen(keys.samples(domain, "log")) == count  # duplicated 0
    _say(f"sync of {count} annotated tasks cut off by Label Studio going down: job 1 failed "
         f"({stopped.error.type}) after {stored_before} stored, cursor kept at task {kept}; "
         f"job 2 resumed from it and stored {result['stored']}; sample set {len(entries)}, "
         f"log {count} entries (lost 0, duplicated 0)")
