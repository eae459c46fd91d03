"""``adapter: "auto"`` through the HTTP API: two real API processes (uvicorn) on one real
redis-server database and one artifact store. Adapters are uploaded to one process; the other
must route with them too (the registry's adapters channel, the live pointer's path).

Domain adapters are statistics-only tiny-SAM adapters (tests/service/auto_support.py); the
test images come from each domain's test split.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from infra.artifacts import ArtifactStore
from infra.redis_client import connect
from infra.registry import Registry
from regcl.adapters.layout import STATS_FILE
from regcl.client import Client, RouterInfo
from regcl.routing import CompactRouter
from service.engine.auto_routing import router_digest
from tests import databases
from tests.service.api_support import ADMIN_KEY, ApiServer, assert_problem, make_adapter
from tests.service.auto_support import domain_image, nowhere

pytestmark = pytest.mark.slow

DOMAINS = ("polyp", "shadow", "camo_pattern")
LATE = "skin"
BOX = [60.0, 60.0, 200.0, 200.0]
SYNC_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def redis_url(redis_server) -> str:
    return databases.emptied(redis_server, databases.AUTO_ROUTING)


@pytest.fixture(scope="module")
def servers(redis_url, start_api, tmp_path_factory) -> tuple[ApiServer, ApiServer]:
    """Two API processes sharing the Redis database and the artifact store."""
    shared = tmp_path_factory.mktemp("auto-artifacts")
    return tuple(start_api(redis_url, tmp_path_factory.mktemp(f"api-auto-{i}"),
                           REGCL_ARTIFACT_URL=str(shared)) for i in range(2))


@pytest.fixture(scope="module")
def adapter_dirs(domain_adapter) -> dict[str, Path]:
    return {name: domain_adapter(name) for name in (*DOMAINS, LATE)}


@pytest.fixture(scope="module")
def stack(servers, adapter_dirs, redis_url, tmp_path_factory) -> Iterator[tuple]:
    """The domains uploaded to the first process, and a live version made and activated."""
    first, second = servers
    with first.api(ADMIN_KEY) as admin:
        for name in DOMAINS:
            admin.upload_adapter(name, adapter_dirs[name])
    client = connect(redis_url)
    registry = Registry(client, ArtifactStore(first.env["REGCL_ARTIFACT_URL"]))
    root = tmp_path_factory.mktemp("auto-live")
    state = root / "merge_state.safetensors"
    save_file({"step": torch.zeros(1)}, str(state))
    live = registry.create_version(make_adapter(root / "live", seed=9, stats=False), state,
                                   {"domains": list(DOMAINS)}).number
    registry.activate(live)
    with first.api() as a, second.api() as b:
        for api in (a, b):
            wait_for(api, lambda r: set(r.domains) == set(DOMAINS))
            wait_for_live(api, live)
        yield a, b, live
    client.close()


def wait_for(api: Client, ready, timeout: float = SYNC_TIMEOUT_S) -> RouterInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = api.router()
        if ready(info):
            return info
        assert time.monotonic() < deadline, f"router of {api.url} never got there: {info}"
        time.sleep(0.2)


def wait_for_live(api: Client, version: int) -> None:
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while api.live_version().live_version != version:
        assert time.monotonic() < deadline, f"{api.url} never served live version {version}"
        time.sleep(0.2)


def test_an_image_of_each_domain_routes_to_its_adapter_in_every_process(stack) -> None:
    a, b, _ = stack
    for api in (a, b):
        for domain in DOMAINS:
            result = api.segment(domain_image(domain, 1), box=BOX, adapter="auto")
            assert result.adapter_version == f"domain:{domain}", result.route
            assert result.route.domain == domain and result.route.confident
            assert result.route.revision == api.get_adapter(domain).sha256
            assert result.route.margin >= result.route.min_margin


def test_the_batch_route_and_the_header_say_what_was_chosen(stack, servers) -> None:
    _, b, _ = stack
    image = b.upload_image(domain_image("shadow", 1))
    batch = b.segment_batch(image, [{"box": BOX}, {"points": [[120, 120]]}], adapter="auto")
    assert batch.adapter_version == "domain:shadow" and batch.route.domain == "shadow"
    assert all(r.route == batch.route for r in batch.results)
    with servers[1].client() as http:
        response = http.post("/v1/segment", json={"image_id": image.image_id, "box": BOX,
                                                  "adapter": "auto"})
    assert response.status_code == 200, response.text
    assert response.headers["X-Regcl-Adapter-Version"] == "domain:shadow"
    route = response.json()["route"]
    assert response.headers["X-Regcl-Route"] == (
        f"chosen=shadow; best=shadow; margin={route['margin']:.6g}; "
        f"novelty={route['novelty']:.6g}")


def test_an_image_from_nowhere_falls_back_to_the_live_version(stack) -> None:
    a, b, live = stack
    for api in (a, b):
        result = api.segment(nowhere(), box=BOX, adapter="auto")
        assert result.route.domain is None and not result.route.confident
        assert result.route.novelty > result.route.max_novelty
        assert result.adapter_version == f"live:{live}"
        assert api.segment(nowhere(), box=BOX).route is None


def test_auto_masks_equal_a_direct_request_with_the_chosen_adapter(stack) -> None:
    a, _, _ = stack
    image = a.upload_image(domain_image("camo_pattern", 2))
    auto = a.segment(image, box=BOX, adapter="auto", return_logits=True)
    direct = a.segment(image, box=BOX, adapter=auto.route.domain, return_logits=True)
    base = a.segment(image, box=BOX, adapter="base", return_logits=True)
    assert direct.adapter_version == auto.adapter_version == "domain:camo_pattern"
    for ours, theirs in zip(auto.masks, direct.masks, strict=True):
        assert np.array_equal(ours.mask, theirs.mask)
        assert np.array_equal(ours.low_res_logits, theirs.low_res_logits)
    assert not np.array_equal(auto.masks[0].low_res_logits, base.masks[0].low_res_logits)


def _scratch(stats: dict) -> CompactRouter:
    """The served router built here from the statistics alone (the tiny SAM's router block
    sees 16 x 16 tokens per image)."""
    return CompactRouter.from_stats(stats, tokens_per_image=256)


def test_new_and_deleted_domains_update_every_router_to_one_built_from_scratch(
        stack, servers, adapter_dirs) -> None:
    a, b, _ = stack
    image = b.upload_image(domain_image(LATE, 1))
    assert b.segment(image, box=BOX, adapter="auto").route.domain != LATE
    with servers[0].api(ADMIN_KEY) as admin:
        admin.upload_adapter(LATE, adapter_dirs[LATE])
        info = wait_for(b, lambda r: LATE in r.domains)
        assert b.segment(image, box=BOX, adapter="auto").adapter_version == f"domain:{LATE}"
        stats = {n: load_file(str(adapter_dirs[n] / STATS_FILE)) for n in (*DOMAINS, LATE)}
        assert info.state_sha256 == router_digest(_scratch(stats))
        admin.delete_adapter("polyp")
        for api in (a, b):
            info = wait_for(api, lambda r: "polyp" not in r.domains)
            del_stats = {n: s for n, s in stats.items() if n != "polyp"}
            assert info.state_sha256 == router_digest(_scratch(del_stats))
            d, k = info.dim, min(128, info.dim)  # shared: the pool's mean and its whitening
            assert info.state_bytes == (d + d * d) * 8 + len(del_stats) * (
                (k * k + d + d - k) * 4 + 2 * 8)  # per domain: K x K, mean, outside, 2 scalars
        polyp = a.segment(domain_image("polyp", 1), box=BOX, adapter="auto")
        assert polyp.route.domain != "polyp" and "polyp" not in polyp.route.scores


def test_auto_is_a_reserved_adapter_name(stack, servers, adapter_dirs) -> None:
    with servers[0].client(ADMIN_KEY) as http:
        files = {field: (file, (adapter_dirs[LATE] / file).read_bytes())
                 for field, file in (("adapter_config", "adapter_config.json"),
                                     ("adapter_model", "adapter_model.safetensors"))}
        assert_problem(http.post("/v1/adapters", data={"name": "auto"}, files=files), 422,
                       "invalid-name")
