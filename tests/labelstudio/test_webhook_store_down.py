"""An annotation webhook while the artifact store (S3) is down (issue #24, case 1: nothing
lost). A private API whose artifact store is a bucket on moto's S3 server, reached only through
the tests' TCP proxy; Label Studio is the tests' file origin, up. With S3 down, the webhook is
answered ``queued`` (not an error), the event stays in the ingest queue while S3 is away (it
was failed and dropped before: a StoreUnavailable is no bad event), and it is stored exactly
once when S3 is back.
"""

from __future__ import annotations

import time
import uuid
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
from tests import databases
from tests.labelstudio.file_origin import TOKEN, FileOrigin
from tests.labelstudio.ls_support import annotation_event, brush_region
from tests.s3_support import MotoS3
from tests.service.api_support import ADMIN_KEY, ApiServer, make_image, png_bytes
from tests.tcp_proxy import TcpProxy

SIZE = (96, 128)
DOWN_S = 3.0  # how long the event is seen to stay queued while S3 is away


@pytest.fixture
def s3_api(redis_server: RedisServer, origin: FileOrigin, moto_s3: MotoS3,
           start_api: Callable[..., ApiServer]) -> Iterator[tuple[ApiServer, TcpProxy, str]]:
    bucket = moto_s3.create_bucket(f"ls-{uuid.uuid4().hex[:12]}")
    with TcpProxy(moto_s3.port) as proxy:
        api = start_api(databases.emptied(redis_server, databases.LABELSTUDIO_S3),
                        REGCL_ARTIFACT_URL=f"{bucket}/store",
                        **{**moto_s3.env(), "AWS_ENDPOINT_URL_S3": proxy.url},
                        REGCL_LABEL_STUDIO_URL=origin.url, REGCL_LABEL_STUDIO_API_KEY=TOKEN,
                        REGCL_LABEL_STUDIO_WEBHOOK_WAIT_S="30")
        yield api, proxy, f"{bucket}/store"


def test_a_webhook_while_the_store_is_down_is_queued_then_stored_once(
        s3_api: tuple[ApiServer, TcpProxy, str], origin: FileOrigin) -> None:
    api, proxy, store_url = s3_api
    project = 893
    mask = np.zeros(SIZE, dtype=bool)
    mask[12:60, 30:90] = True
    path = origin.add(f"/data/upload/{project}/s3.png", png_bytes(make_image(33, *SIZE)))
    event = annotation_event("ANNOTATION_CREATED", project, 8930, 89300, path,
                             [brush_region(mask)])
    event["annotation"]["updated_at"] = "2026-12-07T20:00:00Z"
    domain = default_domain(project)
    client: redis.Redis = connect(api.env["REGCL_REDIS_URL"])
    store = ArtifactStore(store_url)  # this process reads S3 past the proxy
    samples = SampleSets(client, store, DatasetRegistry(client, store))
    proxy.down()
    try:
        with httpx.Client(base_url=api.url, timeout=120.0,
                          auth=httpx.BasicAuth("labelstudio", ADMIN_KEY)) as http:
            answer = http.post("/labelstudio/webhook", json=event)
        assert answer.status_code == 200 and answer.json()["status"] == "queued", answer.text
        time.sleep(DOWN_S)  # the consumer tries and pauses: the event must stay
        assert client.xlen(keys.LS_INGEST) == 1
        assert client.llen(keys.LS_INGEST_FAILED) == 0
    finally:
        proxy.up()
    started = time.monotonic()
    while client.xlen(keys.LS_INGEST) != 0:
        assert time.monotonic() - started < 120, "the queued webhook was not stored"
        time.sleep(0.1)
    waited = time.monotonic() - started
    assert list(samples.entries(domain)) == [8930]
    assert client.llen(keys.samples(domain, "log")) == 1
    assert client.llen(keys.LS_INGEST_FAILED) == 0
    client.close()
    print(f"\n[reliability] a webhook while S3 was down: 200 queued, kept {DOWN_S:g} s; stored "
          f"once {waited:.1f} s after S3 came back", flush=True)
