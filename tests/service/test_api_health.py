"""Readiness follows Redis (503 while it is down, 200 again once it is back) while
segmentation keeps working without it; with no admin key configured every mutating endpoint
answers 403. The server of this module has a Redis of its own, which the tests stop."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import pytest

from infra.redis_server import RedisServer
from tests.service.api_support import (
    ADMIN_KEY,
    ApiServer,
    assert_problem,
    free_tcp_port,
    make_image,
    png_bytes,
)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis-health"), free_tcp_port()) as server:
        yield server


@pytest.fixture(scope="module")
def server(own_redis, start_api) -> ApiServer:
    return start_api(own_redis.url, REGCL_ADMIN_KEYS="")


def _wait_ready(client, status: int, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/readyz")
        if response.status_code == status or time.monotonic() > deadline:
            assert response.status_code == status, response.text
            return response.json()
        time.sleep(0.2)


def test_mutations_are_disabled_without_admin_keys(server):
    with server.client(ADMIN_KEY) as client:
        for method, path in (("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/x"),
                             ("POST", "/v1/datasets"), ("POST", "/v1/jobs/train"),
                             ("POST", "/v1/versions/1/activate")):
            assert_problem(client.request(method, path, json={}), 403, "mutations-disabled")
        assert client.get("/v1/adapters").json() == {"adapters": []}  # reads stay open


def test_readiness_follows_redis_and_segmentation_does_not_need_it(server, own_redis):
    image = base64.b64encode(png_bytes(make_image(5))).decode()
    with server.client() as client:
        ready = _wait_ready(client, 200)
        assert ready["model_loaded"] is True and ready["redis"] is True
        own_redis.stop()
        try:
            down = _wait_ready(client, 503)
            assert down == {"status": "not-ready", "model_loaded": True, "redis": False,
                            "live_version": None, "served_version": None}
            assert client.get("/healthz").status_code == 200
            response = client.get("/v1/adapters")
            assert_problem(response, 503, "backend-unavailable")
            assert response.headers["Retry-After"]
            assert "redis" not in response.text.lower()  # no internals in the problem
            segment = client.post("/v1/segment", json={"image_base64": image,
                                                       "box": [5, 5, 60, 60]})
            assert segment.status_code == 200 and segment.json()["adapter_version"] == "base"
        finally:
            own_redis.start()
        _wait_ready(client, 200)
        assert client.get("/v1/adapters").status_code == 200
