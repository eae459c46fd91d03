"""Fixtures of the Label Studio backend tests: the REAL API server (uvicorn subprocess) on the
session's redis-server, database ``databases.LABELSTUDIO``, whose Label Studio is a
:class:`FileOrigin` (a real HTTP server serving task images) reached through a
:class:`TcpProxy` (passing bytes through unless a test makes Label Studio slow or down); the
end-to-end test against Label Studio itself has its own stack (``test_labelstudio_e2e.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
import redis

from infra.redis_client import connect
from infra.redis_server import RedisServer
from tests import databases
from tests.labelstudio.file_origin import TOKEN, FileOrigin
from tests.service.api_support import ADMIN_KEY, ApiServer
from tests.tcp_proxy import TcpProxy

DB = databases.LABELSTUDIO
MAX_IMAGE_BYTES = 300_000
TRAIN_EVERY = 4


@pytest.fixture(scope="session")
def origin() -> Iterator[FileOrigin]:
    with FileOrigin() as server:
        yield server


@pytest.fixture(scope="session")
def ls_proxy(origin: FileOrigin) -> Iterator[TcpProxy]:
    """The way from the API to the file origin (a test that takes it down puts it back)."""
    with TcpProxy(origin.port) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def ls_api(redis_server: RedisServer, ls_proxy: TcpProxy,
           start_api: Callable[..., ApiServer]) -> ApiServer:
    """The API with REGCL_LABEL_STUDIO_URL = the file origin, through ``ls_proxy`` (2 s fetch
    limit, small images, an idle webhook waited for up to 30 s, a continual step every
    TRAIN_EVERY annotation changes; no worker: jobs stay queued)."""
    redis_url = databases.emptied(redis_server, DB)
    return start_api(redis_url, REGCL_LABEL_STUDIO_URL=ls_proxy.url,
                     REGCL_LABEL_STUDIO_API_KEY=TOKEN,
                     REGCL_LABEL_STUDIO_MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES),
                     REGCL_LABEL_STUDIO_FETCH_TIMEOUT_S="2",
                     # an idle webhook's answer is the stored result, however slow the machine
                     REGCL_LABEL_STUDIO_WEBHOOK_WAIT_S="30",
                     REGCL_LABEL_STUDIO_TRAIN_EVERY=str(TRAIN_EVERY))


@pytest.fixture
def ls_redis(ls_api: ApiServer) -> Iterator[redis.Redis]:
    """A client on the LS API's Redis database (not emptied)."""
    client = connect(ls_api.env["REGCL_REDIS_URL"])
    yield client
    client.close()


@pytest.fixture
def ls_admin(ls_api: ApiServer) -> Iterator[httpx.Client]:
    """A client sending the admin key as Label Studio does: HTTP basic auth."""
    with httpx.Client(base_url=ls_api.url, timeout=120.0,
                      auth=httpx.BasicAuth("labelstudio", ADMIN_KEY)) as client:
        yield client


@pytest.fixture
def ls_anon(ls_api: ApiServer) -> Iterator[httpx.Client]:
    with ls_api.client() as client:
        yield client
