"""One owner of the loaded domain adapters, over real HTTP: a server that keeps ONE domain
adapter loaded serves concurrent requests across three, evicting and reloading them, and
no error reaches a client; every answer equals what a freshly loaded adapter gives."""

from __future__ import annotations

import base64
import random
import re
import threading
from pathlib import Path

import httpx
import numpy as np
import pycocotools.mask as mask_utils
import pytest

from regcl.adapters import read_adapter
from regcl.models import build_sam
from service.engine import SegmentationEngine
from tests.service.api_support import ADMIN_KEY, make_adapter, make_image, png_bytes
from tests.service.test_api_adapters import upload

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


def _segment(client: httpx.Client, image_id: str, adapter: str) -> httpx.Response:
    return client.post("/v1/segment", json={"image_id": image_id, "box": BOX,
                                            "multimask": False, "adapter": adapter,
                                            "return_logits": True})


def _concurrently(client: httpx.Client, requests: list[tuple[str, str]]
                  ) -> list[httpx.Response]:
    """Every (image_id, adapter) request at once, one thread each."""
    barrier = threading.Barrier(len(requests))
    responses: list[httpx.Response | BaseException | None] = [None] * len(requests)

    def run(index: int, image_id: str, adapter: str) -> None:
        try:
            barrier.wait()
            responses[index] = _segment(client, image_id, adapter)
        except BaseException as exc:  # reported below, not lost in the thread
            responses[index] = exc

    threads = [threading.Thread(target=run, args=(i, *request))
               for i, request in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [r for r in responses if not isinstance(r, httpx.Response)]
    assert errors == []
    return responses  # type: ignore[return-value]


def _metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _mask(body: dict) -> np.ndarray:
    rle = body["masks"][0]["rle"]
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def _logits(body: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(body["masks"][0]["low_res_logits"]), dtype="<f4")


def test_evicted_domain_adapters_reload_under_concurrent_requests(
        one_slot_server, redis_client, tmp_path: Path):
    directories = {name: make_adapter(tmp_path / name, seed=31 + i)
                   for i, name in enumerate(DOMAINS)}
    # A fresh load of each adapter, in this process: what every answer must equal.
    fresh = SegmentationEngine(build_sam("tiny"), cache_bytes=0, max_domains=len(DOMAINS))
    for name, directory in directories.items():
        fresh.load_domain(name, read_adapter(directory))
    with one_slot_server.client(ADMIN_KEY) as client:
        for name, directory in directories.items():
            assert upload(client, name, directory).status_code == 201
        ids = []
        for image in IMAGES:
            response = client.post("/v1/images", files={"file": ("i.png", png_bytes(image),
                                                                  "image/png")})
            assert response.status_code == 201, response.text
            ids.append(response.json()["image_id"])
        want = {(image_id, name): fresh.segment(fresh.register_image(image), box=np.array(BOX),
                                                multimask=False, adapter=name)
                for image, image_id in zip(IMAGES, ids, strict=True) for name in DOMAINS}
        assert not np.allclose(want[ids[0], DOMAINS[0]].low_res_logits,
                               want[ids[0], DOMAINS[1]].low_res_logits, atol=1e-2)

        rng = random.Random(0)
        for _ in range(ROUNDS):  # at most one adapter stays loaded: each round reloads
            requests = [(image_id, name) for image_id in ids for name in DOMAINS] * REPEATS
            rng.shuffle(requests)
            for (image_id, name), response in zip(requests, _concurrently(client, requests),
                                                  strict=True):
                assert response.status_code == 200, response.text  # no error reached us
                body = response.json()
                assert body["adapter_version"] == f"domain:{name}"
                expected = want[image_id, name]
                np.testing.assert_allclose(_logits(body), expected.low_res_logits.ravel(),
                                           atol=1e-4)
                assert (_mask(body) != expected.masks[0]).mean() <= 1e-4

        loads = _metric(client, "regcl_domain_adapter_loads_total")
        assert loads >= len(DOMAINS) + (ROUNDS - 1) * (len(DOMAINS) - 1)  # real reloads
        assert _metric(client, "regcl_domain_adapters_loaded") == 1  # back to the limit
    fresh.close()
