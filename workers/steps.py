"""The building blocks the tasks are made of: fetch and check registry entries, turn datasets
into tensors, store adapters and versions. Each is a few lines over ``regcl`` and ``infra``.

Every adapter and version they load is checked against the workers' base model
(:mod:`infra.base_model`: another base is refused with ``BaseModelMismatch``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import torch
from peft import LoraConfig, PeftModel
from redis.lock import Lock
from segment_anything.modeling import Sam

from infra.base_model import base_metadata as infra_base_metadata
from infra.base_model import check_base_model, same_base_model
from infra.datasets import DatasetRecord, open_dataset
from infra.errors import Conflict, NotFound
from infra.registry import AdapterRecord, VersionRecord
from regcl.adapters import (
    AdapterFiles,
    attach_lora,
    collect_gram_stats,
    load_adapter,
    read_adapter,
    save_adapter,
    unwrap,
)
from regcl.data.types import SampleDataset
from regcl.errors import MergeError, StatsError
from regcl.evaluation.clicks import click_curves, image_embeddings, interactive_summary
from regcl.evaluation.evaluate import evaluate_points
from regcl.merging import ContinualMergeState, make_params
from regcl.merging.catalogue import STATS_METHODS
from regcl.models.decoding import preprocess
from regcl.training.adapter import (
    TrainConfig,
    encoder_prefix_cache,
    evaluate_prefix,
    gram_stats_from_prefix,
    train_adapter,
)
from workers.params import EvaluateParams, StatsParams, TrainParams
from workers.prepare import (
    DomainTensors,
    iter_model_input,
    load_domain,
    sample_indices,
)
from workers.runtime import WorkerRuntime

__all__ = [
    "adapter_files",
    "base_metadata",
    "check_base",
    "check_unchanged",
    "chunk_gram_stats",
    "dataset_chunks",
    "dataset_gram_stats",
    "dataset_tensors",
    "ensure_new_adapter",
    "evaluate_chunks",
    "evaluate_dataset",
    "fit_adapter",
    "fold_adapters",
    "holdout_metrics",
    "load_adapter_model",
    "load_version_model",
    "open_registered_dataset",
    "register_adapter",
    "start_state",
    "store_version",
    "train_config",
]

logger = logging.getLogger(__name__)

CHUNK = 64
"""Samples held in memory at a time by evaluation and statistics jobs."""


def base_metadata(rt: WorkerRuntime) -> dict[str, str]:
    """What an adapter or version records about the base model it was made on."""
    return infra_base_metadata(rt.settings.model, rt.base_fingerprint())


def check_base(rt: WorkerRuntime, metadata: dict[str, Any], what: str) -> None:
    """BaseModelMismatch if ``metadata`` names another base model than the workers' one."""
    check_base_model(metadata, rt.settings.model, rt.base_fingerprint(), what)


def ensure_new_adapter(rt: WorkerRuntime, name: str) -> None:
    """Conflict if adapter ``name`` exists (checked before hours of work, not only after)."""
    try:
        rt.registry.get_adapter(name)
    except NotFound:
        return
    raise Conflict(f"adapter {name!r} already exists; adapters are immutable, choose a new name")


def open_registered_dataset(rt: WorkerRuntime, name: str
                            ) -> tuple[DatasetRecord, SampleDataset]:
    """Dataset ``name``: its record and its samples (fetched once per content digest)."""
    record = rt.datasets.get_dataset(name)
    local = rt.datasets.fetch_dataset(name, rt.cache_dir / "datasets")
    return record, open_dataset(local, max_pixels=rt.settings.max_image_pixels)


def _input_frame(sam: Sam) -> tuple[int, list[float]]:
    return sam.image_encoder.img_size, sam.pixel_mean.flatten().tolist()


def dataset_tensors(rt: WorkerRuntime, name: str, sam: Sam, *, max_samples: int | None,
                    seed: int) -> tuple[DatasetRecord, DomainTensors]:
    """Dataset ``name`` (or a seeded subset) at ``sam``'s input size, all in host memory
    (training needs it all; each batch goes to the worker's device as it is used, so device
    memory does not grow with the dataset)."""
    record, dataset = open_registered_dataset(rt, name)
    return record, load_domain(dataset, *_input_frame(sam), max_samples=max_samples, seed=seed)


def dataset_chunks(rt: WorkerRuntime, name: str, sam: Sam, *, max_samples: int | None,
                   seed: int) -> tuple[DatasetRecord, Iterator[DomainTensors]]:
    """Dataset ``name`` (or a seeded subset) at ``sam``'s input size, :data:`CHUNK` samples
    at a time in host memory (memory stays bounded; batches go to the device as used)."""
    record, dataset = open_registered_dataset(rt, name)
    indices = sample_indices(len(dataset), max_samples, seed)
    return record, iter_model_input(dataset, indices, *_input_frame(sam), CHUNK)


def evaluate_dataset(rt: WorkerRuntime, name: str, sam: Sam, params: EvaluateParams,
                     check: Callable[[], None]) -> dict[str, Any]:
    """Mean IoU / Dice / MAE of ``sam`` (with whatever adapter it carries) on dataset
    ``name``, with the evaluation protocol's fixed random point prompts; plus ``count`` and,
    unless ``params.clicks`` is 0, ``clicks`` (the click protocol's means).
    ``check`` is called before each chunk (it raises to stop, e.g. on cancellation)."""
    _, chunks = dataset_chunks(rt, name, sam, max_samples=params.max_samples, seed=params.seed)
    return evaluate_chunks(sam, chunks, params, check)


def evaluate_chunks(sam: Sam, chunks: Iterable[DomainTensors], params: EvaluateParams,
                    check: Callable[[], None]) -> dict[str, Any]:
    """The compute of an evaluation job, on ``sam``'s device: mean scores over ``chunks``
    (the click protocol decodes on the device and places each click on the host)."""
    sums, count, curves = {"iou": 0.0, "dice": 0.0, "mae": 0.0}, 0, []
    for chunk in chunks:
        check()
        scores = evaluate_points(sam, chunk.images, chunk.masks, seed=params.seed,
                                 n_points=params.n_points, batch_size=params.batch_size)
        for key in sums:
            sums[key] += scores[key] * len(chunk)
        count += len(chunk)
        if params.clicks:
            with torch.no_grad():
                curves.append(click_curves(sam, image_embeddings(sam, chunk.images),
                                           chunk.masks, max_clicks=params.clicks,
                                           feedback=params.click_feedback,
                                           batch_size=params.batch_size))
    out: dict[str, Any] = {**{key: total / count for key, total in sums.items()}, "count": count}
    if curves:
        out["clicks"] = {"max_clicks": params.clicks, "feedback": params.click_feedback,
                         **interactive_summary(torch.cat(curves))}
    return out


def dataset_gram_stats(rt: WorkerRuntime, model: PeftModel, name: str, params: StatsParams,
                       check: Callable[[], None]
                       ) -> tuple[DatasetRecord, dict[str, torch.Tensor], int]:
    """Gram statistics of every LoRA input of ``model`` on dataset ``name`` (streamed in
    batches; ``check`` is called before each); returns the dataset's record, the statistics
    and the number of samples."""
    record, chunks = dataset_chunks(rt, name, unwrap(model), max_samples=params.max_samples,
                                    seed=params.seed)
    return (record, *chunk_gram_stats(model, chunks, params.batch_size, check))


def chunk_gram_stats(model: PeftModel, chunks: Iterable[DomainTensors], batch_size: int,
                     check: Callable[[], None]) -> tuple[dict[str, torch.Tensor], int]:
    """The compute of a statistics job, on the model's device: the Gram statistics of every
    LoRA input over ``chunks`` (whole encoder passes), and the number of samples seen."""
    sam, seen = unwrap(model), 0

    def run() -> Iterator[None]:
        nonlocal seen
        for chunk in chunks:
            for i in range(0, len(chunk), batch_size):
                check()
                images = chunk.images[i : i + batch_size].to(sam.device)
                sam.image_encoder(preprocess(sam, images))
                yield None
            seen += len(chunk)

    return collect_gram_stats(model, run_batches=run), seen


class JobLike(Protocol):
    """What :func:`fit_adapter` reports to (a :class:`~workers.protocol.JobHandle`)."""

    def phase(self, fraction: float, name: str, **detail: Any) -> None: ...

    def step_reporter(self, start: float, end: float, phase: str
                      ) -> Callable[[Mapping[str, Any]], None]: ...

    def should_stop(self) -> bool: ...


def fit_adapter(model: PeftModel, train_set: DomainTensors, holdout: DomainTensors,
                params: TrainParams, job: JobLike, span: tuple[float, float] = (0.05, 0.95)
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The compute of training one adapter, on the model's device: train the model's LoRA on
    ``train_set`` (frozen encoder prefix cached once), collect the Gram statistics of its
    inputs and score it on ``holdout``. Progress runs over ``span`` of the job (train, then
    stats). Returns (statistics, metrics)."""
    start, end = span
    prefix = encoder_prefix_cache(model, train_set.images)
    job.phase(start, "train", samples=len(train_set))
    train_end = start + (end - start) * 8 / 9  # train: 0.05 -> 0.85 of a train job
    history = train_adapter(model, train_set.images, train_set.masks, train_config(params),
                            progress=job.step_reporter(start, train_end, "train"),
                            should_stop=job.should_stop, prefix=prefix)
    job.phase(train_end, "stats")
    stats = gram_stats_from_prefix(model, prefix)
    metrics = {**holdout_metrics(model, holdout, params.seed, params.n_points),
               "train": history}
    return stats, metrics


def train_config(params: TrainParams) -> TrainConfig:
    return TrainConfig(epochs=params.epochs, batch_size=params.batch_size, lr=params.lr,
                       min_lr=params.min_lr, seed=params.seed, n_points=params.n_points,
                       interactive_rounds=params.interactive_rounds,
                       points_only=params.points_only)


def holdout_metrics(model: PeftModel, holdout: DomainTensors, seed: int, n_points: int
                    ) -> dict[str, dict[str, float]]:
    """IoU / Dice / MAE on the held-out samples with the adapter and, for comparison, without."""
    prefix = encoder_prefix_cache(model, holdout.images)
    tuned = evaluate_prefix(model, prefix, holdout.masks, seed=seed, n_points=n_points)
    with model.disable_adapter():
        base = evaluate_prefix(model, prefix, holdout.masks, seed=seed, n_points=n_points)
    return {"holdout": tuned, "holdout_base": base}


def register_adapter(rt: WorkerRuntime, model: PeftModel, name: str, *,
                     stats: dict[str, torch.Tensor] | None,
                     metadata: dict[str, Any]) -> AdapterRecord:
    """Write the model's adapter (+ stats + metadata) and add it to the registry as ``name``."""
    with rt.scratch_dir() as tmp:
        save_adapter(model, tmp / name, stats=stats, metadata=metadata)
        return rt.registry.add_adapter(name, tmp / name, metadata)


def adapter_files(rt: WorkerRuntime, name: str, *, need_stats: bool
                  ) -> tuple[AdapterRecord, AdapterFiles]:
    """Adapter ``name`` read from the registry, checked against the base model (and for
    statistics if ``need_stats``) before its weights are downloaded."""
    record = rt.registry.get_adapter(name)
    if need_stats and not record.has_stats:
        raise StatsError(
            f"adapter {name!r} has no Gram statistics, which RegCL merging needs: compute them "
            "with a stats job on a small calibration set of its domain, then merge the new "
            "adapter (or merge with method 'mean')")
    check_base(rt, record.metadata, f"adapter {name!r}")
    files = read_adapter(rt.registry.fetch_adapter(name, rt.cache_dir / "adapters"))
    check_base(rt, files.metadata, f"adapter {name!r}")
    return record, files


def start_state(rt: WorkerRuntime, method: str, params: dict[str, Any], fresh: bool
                ) -> tuple[VersionRecord | None, ContinualMergeState]:
    """The merge state to fold into: the latest version's if it was made with the same method,
    parameters and base model (and not ``fresh``), else an empty one. Returns (parent, state)."""
    wanted = make_params(method, **params).to_dict()
    latest = rt.registry.latest_version()
    if latest is None or fresh:
        return None, ContinualMergeState(method, **params)
    lineage = latest.lineage
    if not same_base_model(lineage, rt.base_fingerprint()):
        logger.warning("version %d was made on another base model; starting afresh",
                       latest.number)
        return None, ContinualMergeState(method, **params)
    local = rt.registry.fetch_version(latest.number, rt.cache_dir / "versions")
    state = ContinualMergeState.load(local / latest.state_file)
    if state.method != method or state.params.to_dict() != wanted:
        logger.info("version %d was merged with %s %s, not %s %s; starting afresh",
                    latest.number, state.method, state.params.to_dict(), method, wanted)
        return None, ContinualMergeState(method, **params)
    return latest, state


def store_version(rt: WorkerRuntime, state: ContinualMergeState, config: LoraConfig,
                  lineage: dict[str, Any], *, fence: Lock | None = None) -> VersionRecord:
    """Write the state's merged adapter (PEFT directory) and the state itself as a new
    version. ``config``: the LoRA config of the folded adapters (they share one layout);
    ``fence``: the merge lock held (the version is registered only while it is)."""
    model = attach_lora(rt.fresh_model(), config)
    meta = {"merged": True, "domains": list(state.domains), "method": state.method,
            **base_metadata(rt)}
    with rt.scratch_dir() as tmp:
        save_adapter(model, tmp / "adapter", weights=state.merged(), metadata=meta)
        state.save(tmp / "merge_state.safetensors")
        return rt.registry.create_version(tmp / "adapter", tmp / "merge_state.safetensors",
                                          {**lineage, **base_metadata(rt)}, fence=fence)


def fold_adapters(rt: WorkerRuntime, state: ContinualMergeState, names: list[str],
                  on_fold: Callable[[int, str], None]
                  ) -> tuple[LoraConfig | None, dict[str, str], dict[str, Any]]:
    """Fold adapters ``names`` into ``state`` in order (``on_fold(i, name)`` before each).
    Returns the LoRA config they share (None if ``names`` is empty), name → sha256 and
    name → the adapter's held-out scores."""
    config: LoraConfig | None = None
    shas: dict[str, str] = {}
    scores: dict[str, Any] = {}
    for i, name in enumerate(names):
        on_fold(i, name)
        record, files = adapter_files(rt, name, need_stats=state.method in STATS_METHODS)
        state.fold(files.weights, files.stats, domain=name)
        shas[name], config = record.sha256, files.config
        scores[name] = record.metadata.get("metrics", {}).get("holdout")
    return config, shas, scores


def load_adapter_model(rt: WorkerRuntime, name: str) -> tuple[AdapterRecord, PeftModel]:
    """Adapter ``name`` attached to a fresh copy of the base model (checked for the base)."""
    record = rt.registry.get_adapter(name)
    check_base(rt, record.metadata, f"adapter {name!r}")
    model, files = load_adapter(rt.fresh_model(),
                                rt.registry.fetch_adapter(name, rt.cache_dir / "adapters"))
    check_base(rt, files.metadata, f"adapter {name!r}")
    return record, model


def load_version_model(rt: WorkerRuntime, number: int) -> PeftModel:
    """Merged version ``number``'s adapter attached to a fresh copy of the base model."""
    record = rt.registry.get_version(number)
    check_base(rt, record.lineage, f"version {number}")
    local = rt.registry.fetch_version(number, rt.cache_dir / "versions")
    return load_adapter(rt.fresh_model(), local / record.adapter_dir)[0]


def check_unchanged(rt: WorkerRuntime, folded: dict[str, str], names: list[str]) -> None:
    """MergeError if an adapter folded in earlier (name → sha256) now has other content: it
    was deleted and uploaded again, and a fold cannot be undone (merge with ``fresh``)."""
    for name in names:
        try:
            current = rt.registry.get_adapter(name).sha256
        except NotFound:
            continue  # deleted since: its contribution stays in the state, which is fine
        if name in folded and folded[name] != current:
            raise MergeError(
                f"adapter {name!r} changed since it was folded into the latest version (it "
                "was deleted and added again); a fold cannot be undone: merge with fresh=true "
                "to start from an empty state, or give the new adapter another name")
