"""``adapter: "auto"`` in the engine (in process): routes, fallback, exactness, router rebuilds.

Domain adapters: statistics-only tiny-SAM adapters (tests/service/auto_support.py); the test
images come from each domain's test split, never from the images behind the statistics.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regcl.adapters import AdapterFiles, read_adapter
from regcl.models import build_sam
from regcl.routing import CompactRouter
from service.engine.auto_routing import DomainRouting, domain_entry, router_digest
from service.engine.segmentation import SegmentationEngine
from tests.service.auto_support import domain_image, nowhere

pytestmark = pytest.mark.slow  # about 30 s: statistics of four domains, a dozen encodes

DOMAINS = ("polyp", "shadow", "camo_pattern")
LATE = "skin"  # registered later
POINT = {"point_coords": [[100.0, 100.0]], "point_labels": [1]}


@pytest.fixture(scope="module")
def adapters(domain_adapter) -> dict[str, AdapterFiles]:
    return {name: read_adapter(domain_adapter(name)) for name in (*DOMAINS, LATE)}


def _entries(adapters: dict[str, AdapterFiles], names: tuple[str, ...]) -> list:
    return [domain_entry(n, f"rev-{n}", adapters[n].stats) for n in names]


@pytest.fixture(scope="module")
def engine(adapters: dict[str, AdapterFiles]) -> SegmentationEngine:
    torch.set_num_threads(1)
    engine = SegmentationEngine(build_sam("tiny"), cache_bytes=2**26)
    for name, files in adapters.items():
        engine.adapters.load_domain(name, files)
    engine.adapters.load_live(7, adapters["polyp"])
    engine.routing.replace(_entries(adapters, DOMAINS))
    yield engine
    engine.close()


def _auto(engine: SegmentationEngine, image: np.ndarray):
    image_id = engine.images.register(image)
    return image_id, engine.segment_many(image_id, [POINT], adapter="auto")[0]


@pytest.mark.parametrize("domain", DOMAINS)
def test_an_image_of_each_domain_routes_to_its_adapter(engine: SegmentationEngine,
                                                       domain: str) -> None:
    _, result = _auto(engine, domain_image(domain, 1))
    assert result.adapter_version == f"domain:{domain}"
    assert result.route.route.domain == domain and result.route.confident
    assert result.route.revision == f"rev-{domain}"
    assert result.route.route.margin >= engine.routing.min_margin


def test_an_image_from_nowhere_falls_back_to_live(engine: SegmentationEngine) -> None:
    _, result = _auto(engine, nowhere())
    assert result.route.route is not None and result.route.route.domain is None
    assert result.route.route.novelty > engine.routing.max_novelty
    assert result.adapter_version == "live:7" and result.route.adapter == "live"


def test_auto_masks_equal_a_direct_request_bit_for_bit(engine: SegmentationEngine) -> None:
    image_id, auto = _auto(engine, domain_image("camo_pattern", 2))
    domain = auto.route.route.domain
    assert domain is not None
    auto_embedding, label = engine.encode(image_id, "auto")  # the one auto cached
    assert label == auto.adapter_version
    assert engine.encode(image_id, domain)[0] is auto_embedding
    engine.cache.drop_where(lambda key: key[0] == image_id)  # the direct one is computed anew
    direct = engine.segment_many(image_id, [POINT], adapter=domain)[0]
    assert not direct.cache_hit and direct.adapter_version == auto.adapter_version
    assert torch.equal(engine.encode(image_id, domain)[0].features, auto_embedding.features)
    assert np.array_equal(direct.low_res_logits, auto.low_res_logits)
    assert np.array_equal(direct.masks, auto.masks) and np.array_equal(direct.scores,
                                                                        auto.scores)
    # and it is not the live adapter's or the base model's answer
    other = engine.segment_many(image_id, [POINT], adapter="base")[0]
    assert not np.array_equal(other.low_res_logits, auto.low_res_logits)


def test_a_new_domain_updates_the_router_and_its_state_equals_one_built_from_scratch(
        engine: SegmentationEngine, adapters: dict[str, AdapterFiles]) -> None:
    image = domain_image(LATE, 1)
    _, before = _auto(engine, image)
    assert before.route.route.best != LATE
    try:
        state = engine.routing.replace(_entries(adapters, (*DOMAINS, LATE)))
        _, after = _auto(engine, image)  # the remembered route is for the old generation
        assert after.adapter_version == f"domain:{LATE}" and after.route.confident
        scratch = CompactRouter.from_stats({n: adapters[n].stats for n in (*DOMAINS, LATE)},
                                           tokens_per_image=256)  # tiny: 16 x 16 tokens
        assert router_digest(state.router) == router_digest(scratch)
        state = engine.routing.replace(_entries(adapters, DOMAINS[1:]))  # polyp deleted
        assert router_digest(state.router) == router_digest(
            CompactRouter.from_stats({n: adapters[n].stats for n in DOMAINS[1:]},
                                     tokens_per_image=256))
        assert router_digest(state.router) != router_digest(scratch)
    finally:
        engine.routing.replace(_entries(adapters, DOMAINS))


def test_statistics_that_cannot_route_are_skipped_with_the_reason(
        adapters: dict[str, AdapterFiles]) -> None:
    routing = DomainRouting(dim=192)
    wide = domain_entry("wide", "r", {k: v for k, v in adapters["polyp"].stats.items()})
    wide = type(wide)("wide", "r", wide.key, torch.eye(8), 10, None)
    state = routing.replace([*_entries(adapters, DOMAINS[:1]), wide])
    assert [d.name for d in state.domains] == ["polyp"] and "192" in state.skipped["wide"]
    assert routing.replace([]).router is None
