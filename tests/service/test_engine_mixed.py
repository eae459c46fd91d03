"""Mixed-adapter batches in the engine: ``base``, ``live``, named domains and ``auto`` requests
queued together share one encoder forward, each image gets its own adapter's answer, and the
mixed path's numerics against folding one adapter at a time (masks equal on the parity
prompts, logits within :data:`MIXED_VS_FOLDED_LOGITS`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regcl.adapters import AdapterFiles, read_adapter
from regcl.models import build_sam
from service.engine.auto_routing import domain_entry
from service.engine.options import ServingOptions
from service.engine.segmentation import SegmentationEngine
from tests.service.auto_support import domain_image
from tests.service.test_engine import LABELS, POINTS, PROMPTS, _randomised_adapter, make_image
from tests.service.test_engine_batching import _concurrently

pytestmark = pytest.mark.slow  # about 40 s: statistics of two domains, two engines

DOMAINS = ("polyp", "shadow")
MIXED_VS_FOLDED_LOGITS = 1e-4
"""Largest |Δ low-res logit| between the mixed and the folded path on the parity prompts
(float32; measured 4.9e-05 at most over 120 requests: 10 images x live and two domains x
the 4 parity prompts, with 0 mask pixels different; embeddings 1.2e-06)."""


@pytest.fixture(scope="module")
def files(domain_adapter, tmp_path_factory) -> dict[str, AdapterFiles]:
    root = tmp_path_factory.mktemp("mixed")
    out = {name: read_adapter(domain_adapter(name)) for name in DOMAINS}
    out["live"] = _randomised_adapter(root / "live", 5)
    return out


def _engine(files: dict[str, AdapterFiles], **options) -> SegmentationEngine:
    engine = SegmentationEngine(build_sam("tiny"), cache_bytes=2**26,
                                options=ServingOptions(**options))
    engine.adapters.load_live(1, files["live"])
    for name in DOMAINS:
        engine.adapters.load_domain(name, files[name])
    engine.routing.replace([domain_entry(n, f"rev-{n}", files[n].stats) for n in DOMAINS])
    return engine


def _together(engine: SegmentationEngine, requests: list[tuple[str, str]]) -> list:
    """Each (image id, adapter) segmented on its own thread, all released at once."""
    results = _concurrently(lambda i: engine.segment(requests[i][0], POINTS, LABELS,
                                                     adapter=requests[i][1]),
                            range(len(requests)))
    return [results[i] for i in range(len(requests))]


def test_every_kind_of_request_shares_one_forward(files):
    """base, live, two named domains: one batch, one encoder forward (the folded path needs
    one per adapter), and each answer equals that request made alone."""
    torch.set_num_threads(1)
    images = [make_image(60 + i) for i in range(4)]
    adapters = ["base", "live", "polyp", "shadow"]
    together = _engine(files, max_batch=4, max_wait_ms=5000)
    alone = _engine(files, max_batch=1)
    folded = _engine(files, max_batch=4, max_wait_ms=5000, mixed=False)
    got = _together(together, [(together.images.register(im), a)
                                for im, a in zip(images, adapters, strict=True)])
    assert together.encoding.batch_stats.batches == 1 and together.encoding.forwards == 1
    _together(folded, [(folded.images.register(im), a)
                       for im, a in zip(images, adapters, strict=True)])
    assert folded.encoding.batch_stats.batches == 1 and folded.encoding.forwards == 4
    for image, adapter, result in zip(images, adapters, got, strict=True):
        want = alone.segment(alone.images.register(image), POINTS, LABELS, adapter=adapter)
        assert result.adapter_version == want.adapter_version
        np.testing.assert_array_equal(result.masks, want.masks)
        np.testing.assert_allclose(result.low_res_logits, want.low_res_logits, atol=1e-4)
    versions = {r.adapter_version for r in got}
    assert versions == {"base", "live:1", "domain:polyp", "domain:shadow"}
    for engine in (together, alone, folded):
        engine.close()


def test_auto_joins_the_batch_and_routes_each_image(files):
    """Auto requests for images of two domains next to base and live ones: every image gets
    its route's adapter, the auto encodes finish from the router's tokens in one forward
    together with the others, and each equals the direct request with its adapter."""
    torch.set_num_threads(1)
    engine = _engine(files, max_batch=4, max_wait_ms=5000)
    alone = _engine(files, max_batch=1)
    images = [domain_image("polyp", 1), domain_image("shadow", 1), make_image(70),
              make_image(71)]
    ids = [engine.images.register(im) for im in images]
    for image_id in ids[:2]:  # route first (prefix batch), so the encodes can meet
        engine.route(image_id)
    forwards = engine.encoding.forwards
    got = _together(engine, list(zip(ids, ["auto", "auto", "base", "live"], strict=True)))
    assert engine.encoding.forwards == forwards + 1
    assert [r.adapter_version for r in got] == ["domain:polyp", "domain:shadow", "base",
                                                "live:1"]
    for image, result in zip(images, got, strict=True):
        adapter = result.adapter_version.removeprefix("domain:").split(":")[0]
        want = alone.segment(alone.images.register(image), POINTS, LABELS, adapter=adapter)
        np.testing.assert_array_equal(result.masks, want.masks)
        np.testing.assert_allclose(result.low_res_logits, want.low_res_logits, atol=1e-4)
    engine.close()
    alone.close()


def test_mixed_and_folded_numerics_on_the_parity_prompts(files):
    """Every parity prompt on three images under live and each domain: masks equal, logits
    within MIXED_VS_FOLDED_LOGITS, and not bit-identical (two paths, two roundings)."""
    torch.set_num_threads(1)
    mixed, folded = _engine(files), _engine(files, mixed=False)
    assert mixed.encoding.encoder.mixes and not folded.encoding.encoder.mixes
    worst, identical = 0.0, True
    for seed in (80, 81, 82):
        image = make_image(seed)
        for adapter in ("live", *DOMAINS):
            for prompt in PROMPTS.values():
                a = mixed.segment(mixed.images.register(image), adapter=adapter, **prompt)
                b = folded.segment(folded.images.register(image), adapter=adapter, **prompt)
                np.testing.assert_array_equal(a.masks, b.masks)
                worst = max(worst, float(np.abs(a.low_res_logits - b.low_res_logits).max()))
                identical &= np.array_equal(a.low_res_logits, b.low_res_logits)
    print(f"mixed vs folded, fp32: masks equal, max |low-res logit difference| {worst:.3g}")
    assert worst <= MIXED_VS_FOLDED_LOGITS and not identical
    mixed.close()
    folded.close()
