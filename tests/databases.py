"""Which database of the session's one redis-server each group of tests owns.

The groups that start a Celery worker keep it for their whole module or session, so two groups
on one database share a queue: a job submitted by one can be taken by the other's worker, which
reads a different artifact store ("artifact not found"). Every group takes its number from here;
tests/test_databases.py checks that no two share one.
"""

from __future__ import annotations

from infra.redis_client import connect
from infra.redis_server import RedisServer

SHARED_API = 0  # tests/conftest.py's API (service tests without a worker)
WORKERS = 1  # tests/workers: the session worker
VERSIONS = 2  # tests/service/test_api_versions.py
BROWSER = 3  # tests/browser: API + worker
CLIENT = 4  # tests/client: API + worker
CLIENT_KEYLESS = 5  # tests/client: an API with no admin keys
LIFECYCLE = 6  # tests/workers/test_workers_lifecycle.py: a worker per test
LABELSTUDIO = 7  # tests/labelstudio: the backend's API
LABELSTUDIO_E2E = 8  # tests/labelstudio/test_labelstudio_e2e.py: API + worker + Label Studio
LABELSTUDIO_GATE = 9  # tests/labelstudio/test_gate_job.py: a worker
AUTO_ROUTING = 10  # tests/service/test_api_auto.py: two API processes, one registry
LABELSTUDIO_TOKENS = 11  # tests/labelstudio/test_backend_tokens.py: an API with a PAT
LABELSTUDIO_PREENCODE = 12  # tests/labelstudio/test_preencode.py: two APIs, one store
LABELSTUDIO_QUEUE = 13  # tests/labelstudio/test_webhook_burst.py: an API killed and restarted
LABELSTUDIO_S3 = 14  # tests/labelstudio/test_webhook_store_down.py: an API on S3 behind a proxy

REDIS_DATABASES = 16  # redis-server's default `databases`


def all_databases() -> dict[str, int]:
    return {name: value for name, value in globals().items()
            if name.isupper() and name != "REDIS_DATABASES" and isinstance(value, int)}


def database_url(server: RedisServer, db: int) -> str:
    """The URL of database ``db`` of the session's redis-server."""
    return f"redis://{server.host}:{server.port}/{db}"


def emptied(server: RedisServer, db: int) -> str:
    """The URL of database ``db``, emptied first: a group starts from nothing, whatever an
    earlier group or run left there."""
    url = database_url(server, db)
    client = connect(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url
