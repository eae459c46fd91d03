"""The engine's dynamic batching, multi-prompt decoding, device options and cache
invalidation on swaps (correctness only; speed is `regcl bench serve`)."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.utils.transforms import ResizeLongestSide

from regcl.errors import ConfigError
from regcl.models import build_sam
from service.engine.batching import Batcher, WriterFirstLock
from service.engine.decode import DecodeJob, decode_rows
from service.engine.options import ServingOptions, host_cores, host_threads
from service.engine.segmentation import SegmentationEngine
from tests.service.test_engine import LABELS, POINTS, _randomised_adapter, make_image

EMBEDDING_BYTES = 128 * 16 * 16 * 4


def _engine(**options) -> SegmentationEngine:
    return SegmentationEngine(build_sam("tiny"), cache_bytes=64 * EMBEDDING_BYTES,
                              options=ServingOptions(**options))


def _concurrently(fn, items):
    results: dict = {}
    errors: list = []
    barrier = threading.Barrier(len(items))

    def run(item):
        try:
            barrier.wait()
            results[item] = fn(item)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    return results


def test_batched_results_equal_unbatched(tmp_path):
    files = _randomised_adapter(tmp_path / "a", 5)
    batched = _engine(max_batch=4, max_wait_ms=300)
    single = _engine(max_batch=1, max_wait_ms=0)
    for engine in (batched, single):
        engine.adapters.load_live(1, files)
    images = [make_image(seed) for seed in range(30, 34)]
    for adapter in ("base", "live"):
        ids = [batched.images.register(image) for image in images]
        got = _concurrently(lambda i, a=adapter: batched.segment(i, POINTS, LABELS, adapter=a),
                            ids)
        for image, image_id in zip(images, ids, strict=True):
            want = single.segment(single.images.register(image), POINTS, LABELS, adapter=adapter)
            assert got[image_id].adapter_version == want.adapter_version
            np.testing.assert_allclose(got[image_id].low_res_logits, want.low_res_logits,
                                       atol=1e-4)
            np.testing.assert_array_equal(got[image_id].masks, want.masks)
    assert batched.encoding.batch_stats.largest > 1  # really batched
    assert single.encoding.batch_stats.largest == 1
    batched.close()
    single.close()


def test_same_image_in_one_batch_is_encoded_once():
    engine = _engine(max_batch=8, max_wait_ms=300)
    image_id = engine.images.register(make_image(40))
    results = _concurrently(lambda k: engine.segment(image_id, POINTS, LABELS), list(range(4)))
    assert engine.stats().encodes == 1
    assert sum(not r.cache_hit for r in results.values()) == 1
    first = next(iter(results.values()))
    for result in results.values():  # their decodes may have run as one batch: rounding
        np.testing.assert_allclose(result.low_res_logits, first.low_res_logits, atol=1e-4)


def test_swap_invalidates_the_cache_and_the_next_encode_uses_the_new_adapter(tmp_path):
    engine = _engine()
    a, b = _randomised_adapter(tmp_path / "a", 6), _randomised_adapter(tmp_path / "b", 7)
    image_id = engine.images.register(make_image(41))
    engine.adapters.load_live(1, a)
    v1 = engine.segment(image_id, POINTS, LABELS)
    assert engine.segment(image_id, POINTS, LABELS).cache_hit
    encodes = engine.stats().encodes
    swap = engine.adapters.load_live(2, b)
    assert swap.dropped_embeddings == 1 and len(engine.cache) == 0
    v2 = engine.segment(image_id, POINTS, LABELS)
    assert v2.adapter_version == "live:2" and not v2.cache_hit
    assert engine.stats().encodes == encodes + 1
    assert not np.array_equal(v1.low_res_logits, v2.low_res_logits)
    engine.adapters.load_live(3, a)  # a again, in a new slot: the same masks as v1, freshly encoded
    v3 = engine.segment(image_id, POINTS, LABELS)
    assert not v3.cache_hit
    np.testing.assert_allclose(v3.low_res_logits, v1.low_res_logits, atol=1e-5)
    engine.close()


def test_segment_many_equals_one_call_per_prompt():
    engine = _engine()
    image_id = engine.images.register(make_image(42))
    prompts = [dict(point_coords=POINTS, point_labels=LABELS),
               dict(point_coords=POINTS[:1], point_labels=LABELS[:1]),
               dict(point_coords=POINTS[::-1], point_labels=LABELS[::-1]),
               dict(box=np.array([20.0, 10.0, 120.0, 90.0])),
               dict(point_coords=POINTS[1:], point_labels=LABELS[1:])]
    for multimask in (True, False):
        many = engine.segment_many(image_id, prompts, multimask=multimask, adapter="base")
        assert len(many) == len(prompts)
        for prompt, got in zip(prompts, many, strict=True):
            want = engine.segment(image_id, multimask=multimask, adapter="base", **prompt)
            np.testing.assert_allclose(got.low_res_logits, want.low_res_logits, atol=1e-4)
            np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
            np.testing.assert_array_equal(got.masks, want.masks)
    assert engine.stats().encodes == 1
    assert engine.segment_many(image_id, []) == []
    engine.close()


def test_options_pick_cpu_defaults_and_refuse_missing_cuda():
    options = ServingOptions().resolved()
    assert options.dtype == torch.float32 and options.sdpa is False  # exact parity
    assert options.max_wait_ms == 0.0
    assert options.threads == max(1, host_cores() - 1) and options.mixed
    assert ServingOptions(threads=0).resolved().threads == 0  # torch's own default
    assert [host_threads("cpu", cores) for cores in (1, 2, 4, 16)] == [1, 1, 3, 15]
    assert host_threads("cuda") == 0
    assert ServingOptions(sdpa=True).resolved().sdpa is True
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            ServingOptions(device="cuda").resolved()
    with pytest.raises(ConfigError):
        ServingOptions(max_batch=0).resolved()


def test_bf16_sdpa_engine_serves_within_tolerance():
    exact, fast = _engine(), _engine(dtype=torch.bfloat16, sdpa=True)
    assert fast.encoding.encoder.dtype == torch.bfloat16
    image = make_image(43)
    want = exact.segment(exact.images.register(image), POINTS, LABELS, multimask=False)
    got = fast.segment(fast.images.register(image), POINTS, LABELS, multimask=False)
    assert (got.masks == want.masks).mean() >= 0.999
    assert abs(float(got.scores[0]) - float(want.scores[0])) < 0.01


def test_batcher_settles_every_future_and_closes():
    seen: list[int] = []

    def run(batch):
        seen.append(len(batch))
        for pending in batch:
            if pending.item < 0:
                pending.future.set_exception(ValueError(pending.item))
            elif pending.item != 99:  # 99 is "forgotten": the batcher settles it
                pending.future.set_result(pending.item * 2)

    batcher = Batcher(run, max_batch=3, max_wait_s=0.2)
    futures = [batcher.submit(i) for i in (1, 2, -3, 4, 99)]
    assert [f.result(5) for f in futures[:2]] == [2, 4]
    with pytest.raises(ValueError):
        futures[2].result(5)
    assert futures[3].result(5) == 8
    with pytest.raises(RuntimeError, match="unsettled"):
        futures[4].result(5)
    assert max(seen) <= 3 and sum(seen) == 5
    boom = Batcher(lambda batch: 1 / 0, max_batch=2, max_wait_s=0)
    with pytest.raises(ZeroDivisionError):
        boom.run(1)
    start = time.monotonic()
    batcher.close()
    boom.close()
    assert time.monotonic() - start < 5
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)


def _wait_for(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_writer_first_lock_lets_a_writer_in_before_the_next_batch():
    """The batcher holds the lock for a batch and, like the encoder thread, asks for it again
    the moment it lets go; a writer (a swap) waits meanwhile. The writer must go before the
    next batch, every time.

    Each step waits for the state it needs (a batch holding the lock, the writer counted as
    waiting), so a correct lock gives this order always; a plain mutex hands the lock back to
    the thread that just released it (it still runs), so the next batch would go first."""
    lock = WriterFirstLock()
    for round_ in range(20):
        order: list[str] = []
        holding, done = threading.Event(), threading.Event()

        def batcher(order=order, holding=holding, done=done) -> None:
            with lock.after_writers():
                order.append("batch 1")
                holding.set()
                done.wait(10)
            with lock.after_writers():
                order.append("batch 2")

        def writer(order=order) -> None:
            with lock:
                order.append("writer")

        threads = [threading.Thread(target=batcher), threading.Thread(target=writer)]
        threads[0].start()
        assert holding.wait(10)
        threads[1].start()
        deadline = time.monotonic() + 10
        while lock.waiting_writers != 1:
            assert time.monotonic() < deadline, "the writer never waited"
            time.sleep(0.001)
        assert order == ["batch 1"], order  # the writer waits while the batch holds the lock
        done.set()
        for thread in threads:
            thread.join(10)
        assert order == ["batch 1", "writer", "batch 2"], (round_, order)
        assert lock.waiting_writers == 0


@pytest.mark.parametrize("multimask", [True, False])
def test_batched_decoding_equals_one_prompt_at_a_time(multimask):
    engine = _engine()
    images = [make_image(50, 120, 200), make_image(51, 90, 70), make_image(52, 200, 150)]
    encoded = [engine.encode(engine.images.register(image), "base")[0] for image in images]
    first = engine.segment(encoded[0].image_id, POINTS[:1] / 3, LABELS[:1], multimask=False,
                           adapter="base")
    forms = [dict(point_coords=POINTS / 3, point_labels=LABELS),
             dict(box=np.array([5.0, 5.0, 60.0, 50.0])),
             dict(point_coords=POINTS[:1] / 3, point_labels=LABELS[:1],
                  box=np.array([5.0, 5.0, 60.0, 50.0]), mask_input=first.low_res_logits)]
    sam = engine.adapters.sam
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    for form in forms:
        jobs = [DecodeJob(e, engine.check_prompt(form.get("point_coords"),
                                                 form.get("point_labels"), form.get("box"),
                                                 form.get("mask_input")), multimask, True)
                for e in encoded]
        rows = decode_rows(sam, transform, jobs)
        for job, got in zip(jobs, rows, strict=True):
            want = decode_rows(sam, transform, [job])[0]
            assert got.masks.shape == want.masks.shape and got.masks.dtype == want.masks.dtype
            np.testing.assert_allclose(got.low_res_logits, want.low_res_logits, atol=1e-4)
            np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
            assert (got.masks != want.masks).mean() <= 1e-4
            assert got.image_id == job.encoded.image_id
    engine.close()


def test_one_row_decodes_as_sam_predictor_bit_for_bit():
    """The one decode path, for a prompt alone, is SamPredictor.predict exactly."""
    engine = _engine()
    image = make_image(53, 90, 140)
    encoded, _ = engine.encode(engine.images.register(image), "base")
    predictor = SamPredictor(engine.adapters.sam)
    predictor.set_image(image)
    transform = ResizeLongestSide(engine.adapters.sam.image_encoder.img_size)
    prompts = [dict(point_coords=POINTS / 2, point_labels=LABELS),
               dict(box=np.array([5.0, 5.0, 60.0, 50.0])),
               dict(point_coords=POINTS[:1] / 2, point_labels=LABELS[:1],
                    box=np.array([5.0, 5.0, 60.0, 50.0]))]
    for multimask in (True, False):
        for prompt in prompts:
            job = DecodeJob(encoded, engine.check_prompt(prompt.get("point_coords"),
                                                         prompt.get("point_labels"),
                                                         prompt.get("box"), None),
                            multimask, True)
            got = decode_rows(engine.adapters.sam, transform, [job])[0]
            masks, scores, logits = predictor.predict(multimask_output=multimask, **prompt)
            np.testing.assert_array_equal(got.masks, masks)
            np.testing.assert_array_equal(got.scores, scores)
            np.testing.assert_array_equal(got.low_res_logits, logits)
    engine.close()


def test_concurrent_prompts_on_cached_embeddings_decode_together():
    engine = _engine()
    ids = [engine.images.register(make_image(seed)) for seed in range(60, 66)]
    expected = {i: engine.segment(i, POINTS, LABELS, adapter="base") for i in ids}
    got = _concurrently(lambda i: engine.segment(i, POINTS, LABELS, adapter="base"), ids)
    for image_id in ids:
        assert got[image_id].cache_hit
        np.testing.assert_allclose(got[image_id].low_res_logits,
                                   expected[image_id].low_res_logits, atol=1e-4)
    engine.close()


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")),
                    reason="torch.compile (inductor) on the CPU needs a C compiler")
def test_compiled_engine_survives_hot_swaps_without_recompiling(tmp_path):
    engine = _engine(compile=True, max_batch=1)
    eager = _engine()
    image = make_image(70)
    files = [_randomised_adapter(tmp_path / f"a{i}", 10 + i) for i in range(2)]
    want = eager.segment(eager.images.register(image), POINTS, LABELS, adapter="base")
    got = engine.segment(engine.images.register(image), POINTS, LABELS, adapter="base")
    np.testing.assert_allclose(got.low_res_logits, want.low_res_logits, atol=1e-3)
    assert engine.encoding.encoder.compiles == 1
    for version, adapter in enumerate(files, start=1):
        engine.adapters.load_live(version, adapter)
        eager.adapters.load_live(version, adapter)
        got = engine.segment(engine.images.register(image), POINTS, LABELS)
        want = eager.segment(eager.images.register(image), POINTS, LABELS)
        assert got.adapter_version == f"live:{version}"
        np.testing.assert_allclose(got.low_res_logits, want.low_res_logits, atol=1e-3)
    assert engine.encoding.encoder.compiles == 1  # swaps were weight copies, not new graphs
    engine.close()
    eager.close()
