"""The serving engine on the real tiny SAM: parity with SamPredictor, caching, hot swaps,
refused adapters, domain adapters, concurrency, and typed prompt errors."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from segment_anything import SamPredictor

from infra.errors import InvalidName
from regcl.adapters import AdapterConfig, AdapterFiles, attach_lora, read_adapter, save_adapter
from regcl.errors import AdapterError, RegclError
from regcl.models import build_sam, model_fingerprint
from regcl.models.build import SAM_SPECS, build_sam_from_spec
from service.engine.caches import ByteLRU, EmbeddingCache, EncodedImage
from service.engine.errors import (
    AdapterRejectedError,
    EmptyPromptError,
    ImageNotFoundError,
    InvalidBoxError,
    InvalidImageError,
    InvalidLabelError,
    NonFiniteValueError,
    OutOfBoundsError,
    PromptShapeError,
    TooManyPointsError,
    UnknownAdapterError,
)
from service.engine.options import ServingOptions
from service.engine.segmentation import SegmentationEngine
from tests.service import api_support

EMBEDDING_BYTES = 128 * 16 * 16 * 4  # tiny: 1 x 128 x 16 x 16 float32
POINTS = np.array([[50.0, 60.0], [150.0, 30.0]])
LABELS = np.array([1, 0])


def make_image(seed: int, height: int = 120, width: int = 200) -> np.ndarray:
    """The API tests' synthetic image, at a size that holds POINTS."""
    return api_support.make_image(seed, height, width)


def _randomised_adapter(directory, seed: int) -> AdapterFiles:
    torch.manual_seed(0)
    model = attach_lora(build_sam_from_spec(SAM_SPECS["tiny"]), AdapterConfig(rank=4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    save_adapter(model, directory, metadata={"seed": seed})
    return read_adapter(directory)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[AdapterFiles]:
    """Three LoRA adapters with different random weights (B != 0, so each changes outputs)."""
    root = tmp_path_factory.mktemp("adapters")
    return [_randomised_adapter(root / f"a{seed}", seed) for seed in (1, 2, 3)]


@pytest.fixture
def engine() -> SegmentationEngine:
    """The CPU default: segment-anything's own attention in float32, bit-exact SamPredictor
    parity (SDPA is within tolerance: test_sdpa_engine_is_close_to_sam_predictor)."""
    return SegmentationEngine(build_sam("tiny"), cache_bytes=64 * EMBEDDING_BYTES)


@pytest.fixture(scope="module")
def reference() -> SamPredictor:
    """segment-anything's own predictor on an untouched copy of the same weights."""
    return SamPredictor(build_sam("tiny"))


PROMPTS = {
    "points-multimask": dict(point_coords=POINTS, point_labels=LABELS, multimask=True),
    "points-single": dict(point_coords=POINTS, point_labels=LABELS, multimask=False),
    "box": dict(box=np.array([20.0, 10.0, 120.0, 90.0]), multimask=False),
    "box-and-point": dict(point_coords=POINTS[:1], point_labels=LABELS[:1],
                          box=np.array([20.0, 10.0, 120.0, 90.0]), multimask=True),
}


def _predict(reference: SamPredictor, prompt: dict):
    return reference.predict(point_coords=prompt.get("point_coords"),
                             point_labels=prompt.get("point_labels"), box=prompt.get("box"),
                             mask_input=prompt.get("mask_input"),
                             multimask_output=prompt["multimask"])


def _assert_same(result, expected) -> None:
    masks, scores, low_res = expected
    assert result.masks.dtype == bool and result.masks.shape == masks.shape
    np.testing.assert_array_equal(result.masks, masks)
    np.testing.assert_array_equal(result.scores, scores)
    np.testing.assert_array_equal(result.low_res_logits, low_res)


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_base_equals_sam_predictor(engine, reference, name):
    image = make_image(0)
    reference.set_image(image)
    prompt = PROMPTS[name]
    result = engine.segment(engine.images.register(image), adapter="base", **prompt)
    assert result.adapter_version == "base"
    _assert_same(result, _predict(reference, prompt))
    assert result.masks.shape[1:] == image.shape[:2]
    assert result.masks.shape[0] == (3 if prompt["multimask"] else 1)


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_sdpa_engine_is_close_to_sam_predictor(reference, name):
    engine = SegmentationEngine(build_sam("tiny"), cache_bytes=64 * EMBEDDING_BYTES,
                                options=ServingOptions(sdpa=True))
    assert engine.options.sdpa
    image = make_image(0)
    reference.set_image(image)
    prompt = PROMPTS[name]
    result = engine.segment(engine.images.register(image), adapter="base", **prompt)
    masks, scores, low_res = _predict(reference, prompt)
    np.testing.assert_allclose(result.low_res_logits, low_res, atol=1e-3)
    np.testing.assert_allclose(result.scores, scores, atol=1e-4)
    assert (result.masks != masks).mean() <= 1e-4
    engine.close()


def test_mask_input_round_trip_equals_sam_predictor(engine, reference):
    image = make_image(1, 90, 70)
    reference.set_image(image)
    image_id = engine.images.register(image)
    first = engine.segment(image_id, POINTS[:1] / 3, LABELS[:1], adapter="base", multimask=False)
    prompt = dict(point_coords=POINTS[:1] / 3, point_labels=LABELS[:1],
                  mask_input=first.low_res_logits, multimask=False)
    _assert_same(engine.segment(image_id, adapter="base", **prompt), _predict(reference, prompt))


def test_base_is_exact_while_adapters_are_loaded(engine, reference, adapters):
    engine.adapters.load_live(1, adapters[0])
    engine.adapters.load_domain("polyp", adapters[1])
    image = make_image(2)
    reference.set_image(image)
    image_id = engine.images.register(image)
    engine.segment(image_id, POINTS, LABELS, adapter="live")  # leaves the live adapter active
    prompt = PROMPTS["points-multimask"]
    _assert_same(engine.segment(image_id, adapter="base", **prompt), _predict(reference, prompt))


def test_second_segment_hits_the_cache(engine):
    image_id = engine.images.register(make_image(3))
    assert engine.images.register(make_image(3)) == image_id  # content hash
    first = engine.segment(image_id, POINTS, LABELS)
    second = engine.segment(image_id, POINTS[:1], LABELS[:1])
    assert (first.cache_hit, second.cache_hit) == (False, True)
    stats = engine.stats()
    assert stats.encodes == 1 and stats.embeddings.hits == 1 and stats.embeddings.entries == 1
    assert first.adapter_version == "base"  # no live adapter yet: "live" is the base model


def test_byte_lru_evicts_least_recently_used_and_skips_oversize():
    lru: ByteLRU[str, np.ndarray] = ByteLRU(max_bytes=300)
    for key in "abc":
        assert lru.put(key, np.zeros(100, np.uint8))
    assert lru.get("a") is not None  # a is now the most recent
    lru.put("d", np.zeros(100, np.uint8))
    assert lru.lru_keys() == ["c", "a", "d"] and lru.nbytes == 300
    assert lru.get("b") is None
    assert not lru.put("huge", np.zeros(301, np.uint8))  # larger than the cap: not stored
    assert "huge" not in lru and len(lru) == 3
    stats = lru.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.oversize) == (1, 1, 1, 1)
    lru.put("c", np.zeros(250, np.uint8))  # replacing an entry frees its old bytes first
    assert lru.nbytes == 250 and lru.lru_keys() == ["c"]


def test_embedding_cache_byte_cap_evicts_in_the_engine():
    engine = SegmentationEngine(build_sam("tiny"), cache_bytes=2 * EMBEDDING_BYTES)
    ids = [engine.images.register(make_image(seed)) for seed in (10, 11, 12)]
    for image_id in ids:
        engine.segment(image_id, POINTS, LABELS)
    stats = engine.stats().embeddings
    assert stats.entries == 2 and stats.evictions == 1 and stats.nbytes == 2 * EMBEDDING_BYTES
    assert not engine.segment(ids[0], POINTS, LABELS).cache_hit  # evicted: encoded again
    assert engine.segment(ids[2], POINTS, LABELS).cache_hit

    tiny = SegmentationEngine(build_sam("tiny"), cache_bytes=EMBEDDING_BYTES - 1)
    image_id = tiny.images.register(make_image(10))
    result = tiny.segment(image_id, POINTS, LABELS)  # too big to cache, still served
    assert result.masks.shape == (3, 120, 200) and len(tiny.cache) == 0
    assert tiny.stats().embeddings.oversize == 1


def test_swap_changes_version_and_masks(engine, adapters):
    image_id = engine.images.register(make_image(4))
    base = engine.segment(image_id, POINTS, LABELS)
    assert engine.adapters.live_version is None and base.adapter_version == "base"

    swap = engine.adapters.load_live(1, adapters[0])
    assert swap.swapped and swap.previous_version is None and swap.seconds >= 0
    v1 = engine.segment(image_id, POINTS, LABELS)
    assert v1.adapter_version == "live:1" and engine.adapters.live_version == 1 and not v1.cache_hit
    assert not np.array_equal(v1.masks, base.masks)
    held, label = engine.encode(image_id, "live")  # a request that encoded before the swap
    assert label == "live:1"

    swap = engine.adapters.load_live(2, adapters[1])
    assert swap.previous_version == 1 and swap.dropped_embeddings == 1
    assert all(key[1] != held.adapter_key for key in engine.cache.lru_keys())
    misses = engine.stats().embeddings.misses
    v2 = engine.segment(image_id, POINTS, LABELS)
    assert v2.adapter_version == "live:2" and not v2.cache_hit  # v1's embedding not reused
    assert engine.stats().embeddings.misses == misses + 1
    assert not np.array_equal(v2.low_res_logits, v1.low_res_logits)
    assert not np.array_equal(v2.masks, v1.masks)

    late = engine.decode(held, POINTS, LABELS)  # finishes on the embedding it has
    assert late.adapter_version == "live:1"
    np.testing.assert_array_equal(late.low_res_logits, v1.low_res_logits)

    assert not engine.adapters.load_live(2, adapters[1]).swapped  # already live: nothing to do
    assert engine.stats().swaps == 2 and len(engine.adapters.swaps.recent()) == 2
    assert engine.adapters.clear_live() == 2 and engine.adapters.live_label == "base"
    np.testing.assert_array_equal(engine.segment(image_id, POINTS, LABELS).masks, base.masks)


def _with_weights(files: AdapterFiles, change) -> AdapterFiles:
    weights = {k: v.clone() for k, v in files.weights.items()}
    change(weights)
    return dataclasses.replace(files, weights=weights)


def _first_a(weights):
    return next(k for k in weights if "lora_A" in k)


def _bad_adapters(files: AdapterFiles) -> dict[str, AdapterFiles]:
    def nan(w):
        w[_first_a(w)][0, 0] = float("nan")

    def shape(w):
        w[_first_a(w)] = torch.zeros(4, 100)

    def missing(w):
        del w[_first_a(w)]

    decoder_config = LoraConfig(r=4, target_modules=["lin1"])  # also hits the mask decoder
    torch.manual_seed(0)
    decoder_model = get_peft_model(build_sam_from_spec(SAM_SPECS["tiny"]), decoder_config)
    decoder_weights = {k: v.detach().clone() for k, v in decoder_model.state_dict().items()
                       if "lora_" in k}
    return {
        "nan": _with_weights(files, nan),
        "shape": _with_weights(files, shape),
        "missing": _with_weights(files, missing),
        "bias": dataclasses.replace(files, config=dataclasses.replace(files.config, bias="all")),
        "decoder": dataclasses.replace(files, config=decoder_config, weights=decoder_weights),
    }


def test_bad_adapter_is_refused_and_live_unchanged(engine, adapters):
    engine.adapters.load_live(1, adapters[0])
    image_id = engine.images.register(make_image(5))
    before = engine.segment(image_id, POINTS, LABELS)
    slots_before = set(engine.adapters.model.peft_config)
    resident_before = set(engine.encoding.encoder.bank.keys())
    for kind, bad in _bad_adapters(adapters[1]).items():
        with pytest.raises(AdapterRejectedError) as caught:
            engine.adapters.load_live(2, bad)
        assert isinstance(caught.value, AdapterError | ValueError | RegclError), kind
        with pytest.raises(AdapterRejectedError):
            engine.adapters.load_domain("polyp", bad)
        assert engine.adapters.live_version == 1, kind
        assert set(engine.adapters.model.peft_config) == slots_before, kind  # no slot left behind
        assert set(engine.encoding.encoder.bank.keys()) == resident_before, kind
    engine.cache.clear()  # encode again: the served model itself must be unchanged
    after = engine.segment(image_id, POINTS, LABELS)
    assert after.adapter_version == "live:1" and not after.cache_hit
    np.testing.assert_array_equal(after.low_res_logits, before.low_res_logits)
    assert engine.adapters.domains() == []


def test_domain_adapters(adapters):
    engine = SegmentationEngine(build_sam("tiny"), cache_bytes=64 * EMBEDDING_BYTES,
                                max_domains=2)
    image_id = engine.images.register(make_image(6))
    with pytest.raises(UnknownAdapterError):
        engine.segment(image_id, POINTS, LABELS, adapter="polyp")
    engine.adapters.load_live(1, adapters[0])
    engine.adapters.load_domain("polyp", adapters[1])
    polyp = engine.segment(image_id, POINTS, LABELS, adapter="polyp")
    live = engine.segment(image_id, POINTS, LABELS, adapter="live")
    assert polyp.adapter_version == "domain:polyp" and live.adapter_version == "live:1"
    assert not np.array_equal(polyp.low_res_logits, live.low_res_logits)

    engine.adapters.load_domain("camo", adapters[2])
    engine.segment(image_id, POINTS, LABELS, adapter="polyp")  # polyp is now the most recent
    engine.adapters.load_domain("shadow", adapters[0])  # over max_domains: camo (LRU) is unloaded
    assert engine.adapters.domains() == ["polyp", "shadow"]
    assert [s.label for s in engine.adapters.served()] == ["live:1", "domain:polyp",
                                                           "domain:shadow"]
    with pytest.raises(UnknownAdapterError):
        engine.segment(image_id, POINTS, LABELS, adapter="camo")
    shadow = engine.segment(image_id, POINTS, LABELS, adapter="shadow")
    np.testing.assert_array_equal(shadow.low_res_logits, live.low_res_logits)  # same weights

    engine.adapters.load_domain("polyp", adapters[2])  # reloading replaces, and its embeddings go
    again = engine.segment(image_id, POINTS, LABELS, adapter="polyp")
    assert not again.cache_hit and not np.array_equal(again.low_res_logits, polyp.low_res_logits)
    engine.adapters.unload_domain("polyp")
    with pytest.raises(UnknownAdapterError):
        engine.adapters.unload_domain("polyp")
    assert engine.adapters.domains() == ["shadow"]
    for name in ("base", "live", "auto", "", "../x", "Polyp", "a" * 65):
        with pytest.raises(InvalidName):
            engine.adapters.load_domain(name, adapters[0])


def test_concurrent_segments_during_repeated_swaps(engine, adapters):
    images = [engine.images.register(make_image(seed)) for seed in (20, 21, 22)]
    expected = {}  # (image, adapter index) -> low-res logits, computed alone
    for index, files in enumerate(adapters):
        engine.adapters.load_live(100 + index, files)
        for image_id in images:
            expected[image_id, index] = engine.segment(image_id, POINTS, LABELS).low_res_logits
    engine.adapters.load_live(1, adapters[0])  # version v serves adapters[(v - 1) % 3]
    versions = {1}
    errors: list[BaseException] = []
    results = []
    done = threading.Event()

    def segmenter(offset: int) -> None:
        try:
            for i in range(12):
                image_id = images[(i + offset) % len(images)]
                results.append(engine.segment(image_id, POINTS, LABELS))
        except BaseException as exc:
            errors.append(exc)

    def swapper() -> None:
        version = 1
        try:
            while not done.is_set() or version < 4:
                version += 1
                versions.add(version)
                engine.adapters.load_live(version, adapters[(version - 1) % 3])
                time.sleep(0.002)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=segmenter, args=(k,)) for k in range(3)]
    swap_thread = threading.Thread(target=swapper)
    swap_thread.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    swap_thread.join()

    assert errors == []
    assert len(results) == 36
    labels = {r.adapter_version for r in results}
    assert labels <= {f"live:{v}" for v in versions}
    assert len(labels) >= 2  # swaps really happened while requests ran
    for result in results:  # each result was made by exactly the version it reports
        version = int(result.adapter_version.split(":")[1])
        # 1e-4: concurrent requests' encodes and decodes may be batched (float rounding)
        np.testing.assert_allclose(result.low_res_logits,
                                   expected[result.image_id, (version - 1) % 3], atol=1e-4)
    live_keys = {slot.key for slot in engine.adapters.served()}
    assert {key[1] for key in engine.cache.lru_keys()} <= live_keys | {"base"}


def test_unknown_image_and_invalid_images(engine):
    with pytest.raises(ImageNotFoundError) as caught:
        engine.segment("0" * 64, POINTS, LABELS)
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, ValueError)
    with pytest.raises(ImageNotFoundError):
        engine.encode(["not", "an", "id"], "base")
    for bad in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                np.zeros((0, 4, 3), np.uint8), [[1, 2, 3]]):
        with pytest.raises(InvalidImageError):
            engine.images.register(bad)
    small = SegmentationEngine(build_sam("tiny"), EMBEDDING_BYTES, image_store_bytes=100)
    with pytest.raises(InvalidImageError):
        small.images.register(make_image(0))
    image_id = engine.images.register(make_image(7))
    assert engine.forget_image(image_id) and image_id not in engine.images


BOX = np.array([10.0, 10.0, 50.0, 50.0])
BAD_PROMPTS = [
    ("empty", {}, EmptyPromptError),
    ("no-points-left", dict(point_coords=np.zeros((0, 2)), point_labels=[]), EmptyPromptError),
    ("nan-point", dict(point_coords=[[np.nan, 3.0]], point_labels=[1]), NonFiniteValueError),
    ("inf-point", dict(point_coords=[[np.inf, 3.0]], point_labels=[1]), NonFiniteValueError),
    ("outside-x", dict(point_coords=[[201.0, 3.0]], point_labels=[1]), OutOfBoundsError),
    ("outside-y", dict(point_coords=[[3.0, -0.5]], point_labels=[1]), OutOfBoundsError),
    ("label-2", dict(point_coords=[[3.0, 3.0]], point_labels=[2]), InvalidLabelError),
    ("label-text", dict(point_coords=[[3.0, 3.0]], point_labels=["x"]), InvalidLabelError),
    ("label-count", dict(point_coords=[[3.0, 3.0]], point_labels=[1, 0]), PromptShapeError),
    ("labels-missing", dict(point_coords=[[3.0, 3.0]]), PromptShapeError),
    ("points-3d", dict(point_coords=[[3.0, 3.0, 1.0]], point_labels=[1]), PromptShapeError),
    ("ragged", dict(point_coords=[[3.0], [3.0, 1.0]], point_labels=[1, 1]), PromptShapeError),
    ("too-many", dict(point_coords=np.ones((65, 2)), point_labels=np.ones(65)),
     TooManyPointsError),
    ("box-reversed", dict(box=[50.0, 10.0, 10.0, 50.0]), InvalidBoxError),
    ("box-short", dict(box=[1.0, 2.0, 3.0]), PromptShapeError),
    ("box-nan", dict(box=[1.0, np.nan, 3.0, 4.0]), NonFiniteValueError),
    ("box-outside", dict(box=[1.0, 2.0, 300.0, 4.0]), OutOfBoundsError),
    ("mask-shape", dict(box=BOX, mask_input=np.zeros((1, 32, 32))), PromptShapeError),
    ("mask-nan", dict(box=BOX, mask_input=np.full((1, 64, 64), np.nan)), NonFiniteValueError),
]


def test_bad_prompts_raise_their_typed_errors(engine):
    image_id = engine.images.register(make_image(8))
    for name, prompt, error in BAD_PROMPTS:
        with pytest.raises(error) as caught:
            engine.segment(image_id, **prompt)
        assert isinstance(caught.value, RegclError) and isinstance(caught.value, ValueError), name
    assert engine.stats().encodes == 0  # refused before paying for an encode
    with pytest.raises(UnknownAdapterError):
        engine.segment(image_id, box=BOX, adapter="nope")
    edge = engine.segment(image_id, [[200.0, 120.0], [0.0, 0.0]], [1, 0])  # edges are inside
    assert edge.masks.shape == (3, 120, 200)


def test_embedding_cache_keys_by_adapter():
    cache = EmbeddingCache(max_bytes=10 * EMBEDDING_BYTES)
    features = torch.zeros(1, 128, 16, 16)
    for key in ("base", "slot1", "slot2"):
        cache.put(("img", key), EncodedImage("img", features, (8, 8), (256, 256), key, key))
    assert cache.nbytes == 3 * EMBEDDING_BYTES
    assert cache.drop_adapter("slot1") == 1
    assert cache.get(("img", "slot1")) is None and cache.get(("img", "slot2")) is not None


def test_base_fingerprint_ignores_the_adapters(engine, adapters):
    expected = model_fingerprint(build_sam("tiny"))
    assert engine.adapters.base_fingerprint == expected
    engine.adapters.load_live(1, adapters[0])
    assert model_fingerprint(engine.adapters.model) == expected  # a live adapter in the model
    with pytest.raises(RegclError):
        SegmentationEngine(engine.adapters.model, cache_bytes=0)
