"""A personal access token, on the real API server, against a real HTTP server that speaks
Label Studio's token protocol (:class:`FileOrigin` in personal-token mode: ``POST
/api/token/refresh/`` makes access tokens, ``Bearer`` access tokens are checked, legacy tokens
refused): the token is exchanged, sent as Bearer, refreshed once on a 401 - one refresh for
many concurrent requests - and a token Label Studio refuses is a clear problem in predict,
sync and health, with nothing stored and no token shown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from infra.redis_client import connect
from infra.redis_server import RedisServer
from tests import databases
from tests.badinput.bad_support import Store
from tests.labelstudio.file_origin import FileOrigin
from tests.labelstudio.ls_support import (
    annotation_event,
    brush_region,
    keypoint,
    predict_body,
    task,
)
from tests.service.api_support import ADMIN_KEY, ApiServer, assert_problem, make_image, png_bytes

PROJECT = 90


@pytest.fixture(scope="module")
def pat_origin() -> Iterator[tuple[FileOrigin, str]]:
    with FileOrigin() as origin:
        yield origin, origin.personal_tokens(lifetime_s=300)


@pytest.fixture(scope="module")
def pat_api(redis_server: RedisServer, pat_origin: tuple[FileOrigin, str],
            start_api: Callable[..., ApiServer]) -> ApiServer:
    origin, pat = pat_origin
    return start_api(databases.emptied(redis_server, databases.LABELSTUDIO_TOKENS),
                     REGCL_LABEL_STUDIO_URL=origin.url, REGCL_LABEL_STUDIO_API_KEY=pat,
                     REGCL_LABEL_STUDIO_FETCH_TIMEOUT_S="5")


@pytest.fixture
def admin(pat_api: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pat_api.url, auth=("ls", ADMIN_KEY), timeout=120) as client:
        yield client


def _health(client: httpx.Client) -> dict:
    answer = client.get("/labelstudio/health")
    assert answer.status_code == 200, answer.text
    return answer.json()["label_studio"]


def test_a_personal_access_token_is_exchanged_and_refreshed_once_on_a_401(
        pat_api: ApiServer, pat_origin: tuple[FileOrigin, str], admin: httpx.Client) -> None:
    origin, pat = pat_origin
    status = _health(admin)
    assert status["token"] == "personal-access-token" and status["accepted"] is None
    paths = [origin.add(f"/data/upload/9/t{i}.png", png_bytes(make_image(i, 40, 48)))
             for i in range(9)]
    first = admin.post("/labelstudio/predict", json=predict_body([task(1, paths[0])],
                                                                [keypoint(50, 50)]))
    assert first.status_code == 200, first.text
    (_, header), = [r for r in origin.requests if r[0] == paths[0]]
    assert header.startswith("Bearer ") and pat not in header  # the access token, not the PAT
    assert origin.refreshes == 1
    status = _health(admin)
    assert status["accepted"] is True and status["refreshes"] == 1

    # Label Studio stops taking the access token: eight requests at once get 401, and one
    # refresh serves them all (refreshes take a while here, so the others wait on it)
    origin.revoke_access()
    origin.refresh_delay_s = 0.5
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda p: admin.post("/labelstudio/predict", json=predict_body(
                [task(1, p)], [keypoint(50, 50)])), paths[1:]))
    finally:
        origin.refresh_delay_s = 0.0
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert origin.refreshes == 2
    assert _health(admin)["refreshes"] == 2
    log = pat_api.log_file.read_text(errors="replace")
    assert pat not in log and not any(t in log for t in origin.access)  # no token logged
    assert "access token refreshed" in log


def test_a_refused_token_is_a_clear_problem_and_nothing_is_stored(
        pat_api: ApiServer, pat_origin: tuple[FileOrigin, str], admin: httpx.Client) -> None:
    origin, pat = pat_origin
    path = origin.add("/data/upload/9/refused.png", png_bytes(make_image(3, 40, 48)))
    client = connect(pat_api.env["REGCL_REDIS_URL"])
    store = Store(pat_api, client)
    origin.revoke_access()
    origin.pat = "another-token"  # the PAT was revoked in Label Studio: refreshes fail
    try:
        with store.unchanged():
            refused = admin.post("/labelstudio/predict", json=predict_body(
                [task(1, path)], [keypoint(50, 50)]))
            assert_problem(refused, 502, "label-studio-token-refused")
            assert "personal access token" in refused.json()["detail"]
            mask = make_image(0, 40, 48)[:, :, 0] > 128
            assert_problem(admin.post("/labelstudio/webhook", json=annotation_event(
                "ANNOTATION_CREATED", PROJECT, 901, 9010, path, [brush_region(mask)])),
                502, "label-studio-token-refused")
            assert_problem(admin.post("/labelstudio/sync", json={"project": PROJECT}),
                           502, "label-studio-token-refused")
            assert_problem(admin.get("/labelstudio/health", params={"check": "true"}),
                           502, "label-studio-token-refused")
        status = _health(admin)
        assert status["accepted"] is False and "refused" in status["problem"]
        text = admin.get("/labelstudio/health").text + refused.text
        assert pat not in text and "another-token" not in text
    finally:
        origin.pat = pat
        client.close()
