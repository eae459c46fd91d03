"""The object store down or slow under a running deployment (issue #24, case 1).

Real processes: a redis-server, a Celery worker, API processes and moto's S3 server, with the
tests' TCP proxy between every regcl process and S3 (``down``: connections refused and cut;
``latency_s``: each request/answer exchange held that long). This process reads S3 past the
proxy, as another host would.

Down (the suite): while S3 refuses connections (at least 10 s: until the checks below are done),
- an adapter upload answers 503 ``store-unavailable`` with ``Retry-After``, within seconds;
- activating a version this API has never fetched answers the same, and the live pointer
  does not move;
- clicks on the live version keep being answered (the adapter is in memory);
- a new API process starts, is not ready and answers ``live`` requests 503
  ``live-unavailable`` with ``Retry-After`` (never the base model's masks in live's name),
  ``base`` requests 200; once S3 is back it serves the live version by itself;
- a merge submitted meanwhile waits the outage out (``REGCL_STORE_RETRY_S``) and succeeds.
Slow (opt-in, ``REGCL_TEST_MORE_FAULTS=1``; 2 s per request): an upload, a merge, the
activation of a version the API never fetched and a new API's start each end within the
clients' timeout, done or answered 503 ``store-unavailable`` with nothing changed; timed.
Afterwards every artifact in the bucket is complete and matches its digests, and every
registered adapter and version points at one of them.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from regcl.client import Client, ServiceUnavailableError
from regcl.client.client import ADAPTER_FILES
from tests.deploy.support import Deployment, client_of, say, wait_job, wait_served
from tests.deploy.test_s3_multihost import verify_bucket
from tests.reliability.support import more_faults, poll
from tests.s3_support import MotoS3
from tests.service.api_support import ADMIN_KEY, ApiServer, make_adapter, make_image, png_bytes
from tests.tcp_proxy import TcpProxy

PREFIX = "faults"
OUTAGE_S = 10.0
LATENCY_S = 2.0
CLIENT_TIMEOUT_S = 60.0  # what these clients give each request; nothing may take longer
BOX = [10.0, 8.0, 90.0, 70.0]


@pytest.fixture
def stack(tmp_path: Path, moto_s3: MotoS3) -> Iterator[tuple[Deployment, TcpProxy]]:
    """A deployment whose processes reach S3 only through the proxy."""
    bucket = moto_s3.create_bucket(f"regcl-{uuid.uuid4().hex[:12]}")
    proxy = TcpProxy(moto_s3.port)
    env = {**moto_s3.env(), "AWS_ENDPOINT_URL_S3": proxy.url}
    deployment = Deployment(tmp_path, env=env, artifact_url=f"{bucket}/{PREFIX}",
                            model="tiny", store_retry_s=60.0)
    # This process (the verifier, "another host") reads S3 directly (moto_s3's AWS_*).
    try:
        yield deployment, proxy
    finally:
        proxy.down()
        deployment.close()


def _raw(api: ApiServer, method: str, path: str, **kwargs: object) -> httpx.Response:
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      timeout=CLIENT_TIMEOUT_S) as http:
        return http.request(method, path, **kwargs)


def _adapter_upload(directory: Path, name: str) -> dict[str, object]:
    files = {field: (file, (directory / file).read_bytes(), "application/octet-stream")
             for field, file in ADAPTER_FILES.items()}
    return {"data": {"name": name}, "files": files}


def _segment_body(image: np.ndarray, adapter: str = "live") -> dict[str, object]:
    return {"json": {"image_base64": base64.b64encode(png_bytes(image)).decode(), "box": BOX,
                     "multimask": False, "adapter": adapter}}


def _unavailable(response: httpx.Response, code: str) -> None:
    assert response.status_code == 503, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith(f"/{code}"), response.text
    assert int(response.headers["Retry-After"]) > 0


def _timed(call: object) -> tuple[object, float]:
    start = time.monotonic()
    result = call()  # type: ignore[operator]
    return result, time.monotonic() - start


def _check_store(deployment: Deployment, client: Client) -> dict[str, str]:
    """Every artifact complete and verified (read past the proxy); the registry's adapters and
    versions all point at one of them with the same digest."""
    digests = verify_bucket(deployment.store)
    for adapter in client.list_adapters():
        assert digests[f"adapters/{adapter.name}"] == adapter.sha256, adapter.name
    for version in client.list_versions():
        assert digests[f"versions/v{version.number}"] == version.sha256, version.number
    return digests


def _live_stack(deployment: Deployment, client: Client, adapters: list[str]) -> int:
    """Adapters ``adapters`` uploaded (seeds 1, 2, ...), the first merged and served live;
    returns that version."""
    for seed, name in enumerate(adapters, start=1):
        client.upload_adapter(name, make_adapter(deployment.root / name, seed=seed))
    version = wait_job(deployment, client, client.submit_merge(adapters[:1], activate=True)
                       ).result["version"]
    wait_served(deployment, client, version)
    return version


@pytest.mark.slow
def test_object_store_down_for_ten_seconds(stack: tuple[Deployment, TcpProxy]) -> None:
    deployment, proxy = stack
    deployment.start_worker("worker")
    api = deployment.start_api()
    image = make_image(3, 96, 128)
    root = deployment.root
    with Client(api.url, ADMIN_KEY, timeout=CLIENT_TIMEOUT_S) as client:
        v1 = _live_stack(deployment, client, ["one", "two", "three"])
        v2 = wait_job(deployment, client, client.submit_merge(["two"])).result["version"]
        live_mask = client.segment(image, box=BOX, multimask=False).masks[0].mask
        before = _check_store(deployment, client)

        proxy.down()
        down_at = time.monotonic()
        merge = client.submit_merge(["three"], activate=True)  # waits the outage out
        upload, upload_s = _timed(lambda: _raw(api, "POST", "/v1/adapters",
                                               **_adapter_upload(root / "one", "four")))
        _unavailable(upload, "store-unavailable")
        activate, activate_s = _timed(lambda: _raw(api, "POST", f"/v1/versions/{v2}/activate"))
        _unavailable(activate, "store-unavailable")
        assert client.live_version().live_version == v1
        clicks = []
        for _ in range(5):
            result, took = _timed(lambda: client.segment(image, box=BOX, multimask=False))
            assert result.adapter_version == f"live:{v1}"
            assert np.array_equal(result.masks[0].mask, live_mask)
            clicks.append(took)
        fresh, start_s = _timed(deployment.start_api)
        with Client(fresh.url, ADMIN_KEY, timeout=CLIENT_TIMEOUT_S) as fresh_client:
            readiness = fresh_client.ready()
            refused = _raw(fresh, "POST", "/v1/segment", **_segment_body(image))
            base = _raw(fresh, "POST", "/v1/segment", **_segment_body(image, "base"))
            assert not readiness.ready and readiness.live_version == v1
            _unavailable(refused, "live-unavailable")
            with pytest.raises(ServiceUnavailableError) as refused_error:  # the client's view
                fresh_client.segment(image, box=BOX, multimask=False)
            assert refused_error.value.code == "live-unavailable"
            assert refused_error.value.retry_after == int(refused.headers["Retry-After"])
            assert base.status_code == 200 and base.json()["adapter_version"] == "base"
            assert upload_s < OUTAGE_S and activate_s < OUTAGE_S
            time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))
            proxy.up()
            outage_s = time.monotonic() - down_at
            say(f"S3 down {outage_s:.1f} s: upload 503 in {upload_s:.2f} s, activate 503 in "
                f"{activate_s:.2f} s, live clicks 200 (max {max(clicks):.2f} s), a new API up "
                f"in {start_s:.1f} s: not ready, live 503 live-unavailable, base 200")

            merged = wait_job(deployment, client, merge)
            v3 = merged.result["version"]
            back_s = time.monotonic() - down_at
            wait_served(deployment, client, v3)
            wait_served(deployment, fresh_client, v3)
            served_s = time.monotonic() - down_at
            assert fresh_client.ready().ready
            assert fresh_client.segment(image, box=BOX, multimask=False).adapter_version == \
                f"live:{v3}"
        say(f"the merge submitted in the outage succeeded (attempts {merged.attempts}) "
            f"{back_s:.1f} s after S3 went down; both APIs served v{v3} "
            f"{served_s:.1f} s after it went down")
        assert merged.attempts == 1
        client.upload_adapter("four", make_adapter(root / "four", seed=4))
        after = _check_store(deployment, client)
        assert {k: after[k] for k in before} == before  # nothing stored earlier changed
        assert set(after) - set(before) == {f"versions/v{v3}", "adapters/four"}


@more_faults
@pytest.mark.slow
def test_object_store_slow(stack: tuple[Deployment, TcpProxy]) -> None:
    deployment, proxy = stack
    deployment.start_worker("worker")
    api = deployment.start_api()
    image = make_image(4, 96, 128)
    root = deployment.root
    with Client(api.url, ADMIN_KEY, timeout=CLIENT_TIMEOUT_S) as client:
        v1 = _live_stack(deployment, client, ["one", "two"])
        quiet = [_timed(lambda: client.segment(image, box=BOX, multimask=False))[1]
                 for _ in range(5)]
        before = _check_store(deployment, client)

        proxy.latency_s = LATENCY_S
        make_adapter(root / "three", seed=3)
        upload, upload_s = _timed(lambda: _raw(api, "POST", "/v1/adapters",
                                               **_adapter_upload(root / "three", "three")))
        assert upload_s < CLIENT_TIMEOUT_S
        if upload.status_code != 201:  # the store's time ran out: nothing of it was kept
            _unavailable(upload, "store-unavailable")
        merge, merge_s = _timed(lambda: wait_job(
            deployment, client, client.submit_merge(["two"])))
        v2 = merge.result["version"]
        # The API has never fetched v2: activating it reads it from the slow store.
        activate, activate_s = _timed(lambda: _raw(api, "POST", f"/v1/versions/{v2}/activate"))
        assert activate_s < CLIENT_TIMEOUT_S
        if activate.status_code == 200:
            assert activate.json()["served_version"] == v2
            live = v2
        else:  # its store work ran out of time: nothing changed
            _unavailable(activate, "store-unavailable")
            assert client.live_version().live_version == v1
            live = v1
        slow = [_timed(lambda: client.segment(image, box=BOX, multimask=False))[1]
                for _ in range(5)]
        assert {r.adapter_version for r in [client.segment(image, box=BOX)]} == {f"live:{live}"}
        fresh, start_s = _timed(deployment.start_api)
        with client_of(fresh) as fresh_client:
            _, ready_s = _timed(lambda: poll(lambda: fresh_client.ready().ready,
                                             "the new API to be ready", 120.0, 0.2,
                                             on_timeout=deployment.logs))
            assert fresh_client.live_version().served_version == live
        proxy.latency_s = 0.0
        say(f"S3 at {LATENCY_S:.0f} s per request: upload {upload.status_code} in "
            f"{upload_s:.1f} s, merge job {merge_s:.1f} s (attempts {merge.attempts}), "
            f"activation of a version the API never fetched {activate.status_code} in "
            f"{activate_s:.1f} s, a new API up {start_s:.1f} s + ready {ready_s:.1f} s; "
            f"clicks p50 {np.median(slow) * 1000:.0f} ms (quiet "
            f"{np.median(quiet) * 1000:.0f} ms)")
        after = _check_store(deployment, client)
        assert {k: after[k] for k in before} == before
        added = {f"versions/v{v2}"} | ({"adapters/three"} if upload.status_code == 201 else set())
        assert set(after) - set(before) == added
