"""The adapter slot table on the real tiny SAM: a pinned domain slot outlives an unload or a
reload of its name until its request is done; a domain named but not loaded comes from the
source, and again when the source's revision changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from regcl.adapters import AdapterFiles, read_adapter
from regcl.models import build_sam
from service.engine.errors import UnknownAdapterError
from service.engine.segmentation import SegmentationEngine
from tests.service.api_support import make_adapter
from tests.service.test_engine import LABELS, POINTS, make_image


class DirectorySource:
    """Adapters from directories on disk (name -> directory), with a revision per name."""

    def __init__(self, directories: dict[str, Path]) -> None:
        self.directories = dict(directories)
        self.revisions = {name: "r1" for name in directories}
        self.reads: list[str] = []
        self.asked = 0  # revision lookups (the registry: one Redis read each)

    def revision(self, name: str) -> str:
        self.asked += 1
        if name not in self.revisions:
            raise UnknownAdapterError(f"unknown adapter {name!r}")
        return self.revisions[name]

    def files(self, name: str) -> AdapterFiles:
        self.reads.append(name)
        return read_adapter(self.directories[name])


@pytest.fixture(scope="module")
def directories(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("table")
    return {name: make_adapter(root / name, seed=41 + i) for i, name in enumerate("ab")}


def _engine(source: DirectorySource | None, max_domains: int = 1) -> SegmentationEngine:
    return SegmentationEngine(build_sam("tiny"), cache_bytes=2**22, max_domains=max_domains,
                              domain_source=source)


def test_a_pinned_slot_outlives_its_unload_and_its_eviction(directories):
    engine = _engine(DirectorySource(directories))
    image_id = engine.images.register(make_image(7))
    want = engine.segment(image_id, POINTS, LABELS, adapter="a")
    resident = engine.encoding.encoder.bank  # where a served adapter's factors live
    with engine.adapters.use("a") as pinned:
        engine.adapters.unload_domain("a")
        assert engine.adapters.domains() == [] and pinned.key in resident
        engine.segment(image_id, POINTS, LABELS, adapter="b")  # a no longer counts
        assert engine.adapters.domains() == ["b"] and pinned.key in resident
        engine.cache.clear()  # encode with the pinned slot, not from the cache
        encoded, hit = engine.encoding.encode(image_id, pinned)
        assert not hit and encoded.adapter_version == "domain:a"
        got = engine.decode(encoded, POINTS, LABELS)
        np.testing.assert_array_equal(got.low_res_logits, want.low_res_logits)
    assert pinned.key not in resident  # removed with its last pin
    assert engine.adapters.pinned() == 0
    engine.close()


def test_every_slot_pinned_goes_over_the_limit_until_released(directories):
    engine = _engine(DirectorySource(directories))
    with engine.adapters.use("a") as a, engine.adapters.use("b") as b:
        assert engine.adapters.domains() == ["a", "b"]  # both in use: over max_domains=1
        assert {a.key, b.key} <= set(engine.encoding.encoder.bank.keys())
    # b was released first, while a was still in use: b went; then a alone is within limit.
    assert engine.adapters.domains() == ["a"]
    assert b.key not in engine.encoding.encoder.bank
    assert a.key in engine.encoding.encoder.bank
    engine.close()


def test_domains_load_from_the_source_and_reload_on_a_new_revision(directories):
    source = DirectorySource(directories)
    engine = _engine(source, max_domains=2)
    image_id = engine.images.register(make_image(8))
    first = engine.segment(image_id, POINTS, LABELS, adapter="a")
    engine.segment(image_id, POINTS, LABELS, adapter="a")
    assert source.reads == ["a"] and engine.stats().domain_loads == 1
    source.revisions["a"] = "r2"  # uploaded anew (here: the same files)
    again = engine.segment(image_id, POINTS, LABELS, adapter="a")
    assert source.reads == ["a", "a"] and engine.stats().domain_loads == 2
    assert not again.cache_hit  # a new slot: its own embeddings
    np.testing.assert_array_equal(again.low_res_logits, first.low_res_logits)
    with pytest.raises(UnknownAdapterError):
        engine.segment(image_id, POINTS, LABELS, adapter="nope")
    engine.close()


def test_a_slot_loaded_at_the_callers_revision_serves_without_asking_the_source(directories):
    """``auto`` names a domain with the router's revision of it: a slot loaded at that
    revision serves without a registry read per request; a revision the table does not hold
    asks the source and loads anew."""
    source = DirectorySource(directories)
    engine = _engine(source, max_domains=2)
    with engine.adapters.use("a") as first:  # loaded at r1
        pass
    asked = source.asked
    with engine.adapters.use("a", "r1") as slot:
        assert slot is first
    assert source.asked == asked
    source.revisions["a"] = "r2"  # uploaded anew; the router has not resynced yet
    with engine.adapters.use("a", "r1") as stale:
        assert stale is first  # what the router's statistics chose
    assert source.asked == asked
    with engine.adapters.use("a", "r2") as fresh:  # the router resynced
        assert fresh is not first and fresh.revision == "r2"
    assert source.asked == asked + 1 and source.reads == ["a", "a"]
    with engine.adapters.use("a") as named:  # a request naming it asks, as before
        assert named is fresh
    assert source.asked == asked + 2
    engine.close()


def test_without_a_source_an_unloaded_name_is_unknown(directories):
    engine = _engine(None)
    image_id = engine.images.register(make_image(9))
    with pytest.raises(UnknownAdapterError, match="loaded"):
        engine.segment(image_id, POINTS, LABELS, adapter="a")
    engine.adapters.load_domain("a", read_adapter(directories["a"]))
    assert engine.segment(image_id, POINTS, LABELS, adapter="a").adapter_version == "domain:a"
    engine.close()
