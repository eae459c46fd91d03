"""Fixtures of the bad-input catalogue: the REAL server of tests/service (same fixtures),
seeded once per module with a dataset, an adapter with statistics, one without, and a finished
(cancelled) job, so that "nothing stored changed" is checked against a store that holds
something. The catalogue's clients do not empty Redis: every request here must be refused."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from infra.redis_client import connect
from infra.redis_server import RedisServer
from tests import databases
from tests.badinput.bad_support import Store
from tests.service.api_support import (
    ADMIN_KEY,
    ApiServer,
    folder_entries,
    make_adapter,
    make_zip,
)


@dataclass(frozen=True)
class Seed:
    dataset: str
    adapter: str  # with Gram statistics
    plain_adapter: str  # without
    finished_job: str
    adapter_dir: Path  # a valid adapter's files (with statistics)


def _upload_adapter(client: httpx.Client, name: str, directory: Path) -> None:
    files = {"adapter_config": ("adapter_config.json",
                                (directory / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors",
                               (directory / "adapter_model.safetensors").read_bytes())}
    if (directory / "regcl_stats.safetensors").exists():
        files["regcl_stats"] = ("regcl_stats.safetensors",
                                (directory / "regcl_stats.safetensors").read_bytes())
    response = client.post("/v1/adapters", data={"name": name}, files=files)
    assert response.status_code == 201, response.text


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-adapters")
    return {"stats": make_adapter(root / "stats", seed=11),
            "plain": make_adapter(root / "plain", seed=12, stats=False)}


@pytest.fixture(scope="module")
def seeded(api: ApiServer, redis_server: RedisServer,
           adapter_dirs: dict[str, Path]) -> Seed:
    databases.emptied(redis_server, databases.SHARED_API)
    with api.client(ADMIN_KEY) as admin:
        response = admin.post("/v1/datasets", data={"name": "seed-data"},
                              files={"file": ("d.zip", make_zip(folder_entries()),
                                              "application/zip")})
        assert response.status_code == 201, response.text
        _upload_adapter(admin, "seed-stats", adapter_dirs["stats"])
        _upload_adapter(admin, "seed-plain", adapter_dirs["plain"])
        job = admin.post("/v1/jobs/train", json={"dataset": "seed-data", "domain": "seed"})
        assert job.status_code == 202, job.text
        job_id = job.json()["job"]["id"]
        assert admin.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    return Seed("seed-data", "seed-stats", "seed-plain", job_id, adapter_dirs["stats"])


@pytest.fixture
def store(api: ApiServer, redis_server: RedisServer, seeded: Seed
          ) -> Iterator[Store]:
    client = connect(redis_server.url)
    yield Store(api, client)
    client.close()


@pytest.fixture
def anon(api: ApiServer, seeded: Seed) -> Iterator[httpx.Client]:
    """A client without a key (Redis NOT emptied: the module's seed stays)."""
    with api.client() as client:
        yield client


@pytest.fixture
def admin(api: ApiServer, seeded: Seed) -> Iterator[httpx.Client]:
    """A client with the admin key (Redis NOT emptied: the module's seed stays)."""
    with api.client(ADMIN_KEY) as client:
        yield client


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = connect(redis_server.url)
    yield client
    client.close()
