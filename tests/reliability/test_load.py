"""Load on the real HTTP API: N >= 16 concurrent clients segmenting for a bounded time while
versions are activated again and again (no failed request, each response equal to what the
version it names gives for that image when the server is quiet, the embedding cache within its
budget), and while the API process is SIGKILLed and restarted (it comes back serving the live
version)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from regcl.client import ApiError
from tests.reliability.support import (
    LoadClients,
    Rig,
    activate,
    metric,
    reference_logits,
    rss_mib,
    say,
)
from tests.service.api_support import ApiServer, make_adapter, make_image, png_bytes

pytestmark = pytest.mark.slow

CLIENTS = 16
LOAD_S = 20.0
CACHE_BYTES = 2**19  # 4 tiny-SAM embeddings (128 KiB each) for 6 images: it must evict
IMAGES = [png_bytes(make_image(100 + i)) for i in range(6)]


def make_versions(rig: Rig) -> tuple[int, int]:
    state = rig.root / "merge_state.safetensors"
    save_file({"step": torch.zeros(1)}, str(state))
    a = rig.registry.create_version(make_adapter(rig.root / "va", seed=5, stats=False), state,
                                    {"domains": ["a"]})
    b = rig.registry.create_version(make_adapter(rig.root / "vb", seed=6, stats=False), state,
                                    {"domains": ["b"]})
    return a.number, b.number


def serve(server: ApiServer, number: int) -> None:
    assert activate(server, number).version.number == number
    with server.api() as client:
        client.wait_served(number, timeout=120)


def references(server: ApiServer, numbers: tuple[int, ...]) -> dict[str, list[np.ndarray]]:
    """Quiet answers per version label, for each image."""
    out = {}
    for number in numbers:
        serve(server, number)
        out[f"live:{number}"] = reference_logits(server, IMAGES)
    return out


def mismatches(outcomes, refs: dict[str, list[np.ndarray]]) -> list[str]:
    bad = []
    for o in outcomes:
        if o.status != 200:
            continue
        if o.version not in refs or o.error:
            bad.append(f"{o.version}: {o.error}")
        elif not np.allclose(o.logits, refs[o.version][o.image], rtol=0, atol=1e-4):
            bad.append(f"{o.version} image {o.image}: logits differ from that version's")
    return bad


def test_clients_segment_while_versions_are_activated_again_and_again(rig: Rig) -> None:
    a, b = make_versions(rig)
    server = rig.start_api(REGCL_EMBEDDING_CACHE_BYTES=str(CACHE_BYTES))
    refs = references(server, (a, b))
    rss_before = rss_mib(server)
    evictions_before = metric(server, "regcl_embedding_cache_evictions_total")

    stop = threading.Event()
    activations: list[int] = []
    cache: list[tuple[float, float]] = []

    def swap() -> None:
        while not stop.wait(1.0):
            number = (a, b)[len(activations) % 2]
            try:
                activate(server, number)
            except ApiError as exc:
                activations.append(exc.status)
            else:
                activations.append(200)

    def sample() -> None:
        while not stop.wait(0.5):
            cache.append((metric(server, "regcl_embedding_cache_bytes"),
                          metric(server, "regcl_embedding_cache_max_bytes")))

    helpers = [threading.Thread(target=f, daemon=True) for f in (swap, sample)]
    with LoadClients(server, IMAGES, CLIENTS) as load:
        for thread in helpers:
            thread.start()
        time.sleep(LOAD_S)
        stop.set()
    for thread in helpers:
        thread.join(120)
    outcomes = load.outcomes
    failed = [o for o in outcomes if o.status != 200]
    bad = mismatches(outcomes, refs)
    seen = {o.version for o in outcomes}
    rss_after = rss_mib(server)
    evictions = metric(server, "regcl_embedding_cache_evictions_total") - evictions_before
    latencies = sorted(o.ended - o.started for o in outcomes)

    assert len(outcomes) >= CLIENTS
    assert failed == [], failed[:5]
    assert bad == [], bad[:5]
    assert activations and all(code == 200 for code in activations), activations
    assert seen == {f"live:{a}", f"live:{b}"}
    assert cache and all(used <= cap == CACHE_BYTES for used, cap in cache), cache
    assert evictions > 0, cache  # the budget was reached and held
    say(f"{CLIENTS} clients x {LOAD_S:g} s with {len(activations)} activations "
        f"(a<->b every 1 s): {len(outcomes)} requests, {len(failed)} failed, {len(bad)} "
        f"inconsistent with the version they name; {len(outcomes) / LOAD_S:.1f} req/s, "
        f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p99 "
        f"{latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms; embedding cache max "
        f"{max(u for u, _ in cache) / 2**20:.2f} of {CACHE_BYTES / 2**20:.2f} MiB over "
        f"{len(cache)} samples, {evictions:.0f} evictions; API RSS {rss_before:.0f} -> "
        f"{rss_after:.0f} MiB")


def test_the_api_killed_under_load_comes_back_serving_the_live_version(rig: Rig) -> None:
    a, b = make_versions(rig)
    server = rig.start_api()
    refs = references(server, (a, b))  # ends with b live
    with LoadClients(server, IMAGES, CLIENTS) as load:
        time.sleep(4.0)
        killed_at = time.monotonic()
        server.stop(kill=True)
        server.start()  # the same command and port; returns once /healthz answers
        back_at = time.monotonic()
        time.sleep(8.0)
    outcomes = load.outcomes
    before = [o for o in outcomes if o.ended < killed_at]
    down = [o for o in outcomes if o.ended >= killed_at and o.started < back_at]
    after = [o for o in outcomes if o.started >= back_at]
    assert before and after
    assert all(o.status == 200 for o in before + after), \
        [o for o in before + after if o.status != 200][:5]
    assert {o.version for o in after} == {f"live:{b}"}
    assert mismatches(outcomes, refs) == []
    failed_down = [o for o in down if o.status != 200]
    assert all(o.status == 0 for o in failed_down), failed_down[:5]  # refused/reset only
    first_ok = min(o.ended for o in after) - back_at
    say(f"API SIGKILLed under {CLIENTS} clients and restarted: back (healthz) after "
        f"{back_at - killed_at:.1f} s; {len(outcomes)} requests: {len(before)} before the "
        f"kill (0 failed), {len(down)} during the restart ({len(failed_down)} refused or "
        f"reset), {len(after)} after it (0 failed, all live:{b}, first answered "
        f"{first_ok:.2f} s after healthz)")
