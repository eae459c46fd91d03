"""One owner of the loaded domain adapters, over real HTTP: a server that keeps ONE domain
adapter loaded serves concurrent requests across three, evicting and reloading them, and
no error reaches a client; every answer equals what a freshly loaded adapter gives."""

from __future__ import annotations

import random
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from regcl.adapters import read_adapter
from regcl.client import Client, Segmentation
from regcl.models import build_sam
from service.engine.segmentation import SegmentationEngine
from tests.service.api_support import ADMIN_KEY, make_adapter, make_image

pytestmark = pytest.mark.slow

DOMAINS = ("dom-a", "dom-b", "dom-c")
IMAGES = [make_image(seed) for seed in (81, 82)]
BOX = [10.0, 8.0, 90.0, 70.0]
ROUNDS = 2
REPEATS = 2  # requests per (domain, image) in each round


@pytest.fixture(scope="module")
def one_slot_server(redis_server, start_api, tmp_path_factory):
    """A server of its own that keeps at most one domain adapter loaded."""
    return start_api(redis_server.url, tmp_path_factory.mktemp("one-slot"),
                     REGCL_MAX_DOMAIN_ADAPTERS="1")


def _concurrently(client: Client, requests: list[tuple[str, str]]) -> list[Segmentation]:
    """Every (image_id, adapter) segmentation at once, one thread each; any error (an
    ApiError for a 4xx/5xx answer) fails the test."""
    barrier = threading.Barrier(len(requests))
    results: list[Segmentation | BaseException | None] = [None] * len(requests)

    def run(index: int, image_id: str, adapter: str) -> None:
        try:
            barrier.wait()
            results[index] = client.segment(image_id=image_id, box=BOX, multimask=False,
                                            adapter=adapter, return_logits=True)
        except BaseException as exc:  # reported below, not lost in the thread
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i, *request))
               for i, request in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [r for r in results if not isinstance(r, Segmentation)]
    assert errors == []  # no error reached a client
    return results  # type: ignore[return-value]


def _metric(client: Client, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", client.metrics(), re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_evicted_domain_adapters_reload_under_concurrent_requests(
        one_slot_server, redis_client, tmp_path: Path):
    directories = {name: make_adapter(tmp_path / name, seed=31 + i)
                   for i, name in enumerate(DOMAINS)}
    # A fresh load of each adapter, in this process: what every answer must equal.
    fresh = SegmentationEngine(build_sam("tiny"), cache_bytes=0, max_domains=len(DOMAINS))
    for name, directory in directories.items():
        fresh.adapters.load_domain(name, read_adapter(directory))
    with one_slot_server.api(ADMIN_KEY) as client:
        for name, directory in directories.items():
            client.upload_adapter(name, directory)
        ids = [client.upload_image(image).image_id for image in IMAGES]
        want = {(image_id, name): fresh.segment(fresh.images.register(image), box=np.array(BOX),
                                                multimask=False, adapter=name)
                for image, image_id in zip(IMAGES, ids, strict=True) for name in DOMAINS}
        assert not np.allclose(want[ids[0], DOMAINS[0]].low_res_logits,
                               want[ids[0], DOMAINS[1]].low_res_logits, atol=1e-2)

        rng = random.Random(0)
        for _ in range(ROUNDS):  # at most one adapter stays loaded: each round reloads
            requests = [(image_id, name) for image_id in ids for name in DOMAINS] * REPEATS
            rng.shuffle(requests)
            for (image_id, name), got in zip(requests, _concurrently(client, requests),
                                             strict=True):
                assert got.adapter_version == f"domain:{name}"
                expected = want[image_id, name]
                np.testing.assert_allclose(got.masks[0].low_res_logits,
                                           expected.low_res_logits[0], atol=1e-4)
                assert (got.masks[0].mask != expected.masks[0]).mean() <= 1e-4

        loads = _metric(client, "regcl_domain_adapter_loads_total")
        assert loads >= len(DOMAINS) + (ROUNDS - 1) * (len(DOMAINS) - 1)  # real reloads
        assert _metric(client, "regcl_domain_adapters_loaded") == 1  # back to the limit
    fresh.close()
