"""The Celery tasks: thin adapters that read ids, call ``regcl``, and write results and state.

Each is registered under its name in :mod:`workers.celery_app` (``regcl.train``, ...), is called
with ``job_id`` + the keyword arguments :mod:`workers.submit` sends, and runs under the job
protocol of :mod:`workers.protocol` (progress, cancellation, failure, attempt cap). What a task
returns becomes the job's result. Worker side only: this module imports torch.
"""

from __future__ import annotations

from typing import Any

from regcl.adapters import unwrap
from workers import steps
from workers.celery_app import EVALUATE, MERGE, STATS, TRAIN
from workers.params import EvaluateParams, StatsParams, TrainParams, stats_output_name, validate
from workers.prepare import split_holdout
from workers.protocol import JobHandle, job_task
from workers.runtime import get_runtime
from workers.train_step import new_adapter_model, train_and_register

MERGE_LOCK_WAIT_S = 3600.0
"""How long a merge waits for the merge lock (another merge holds it) before it fails."""


@job_task(TRAIN)
def train(job: JobHandle, dataset: str, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    """Train a LoRA adapter for ``domain`` on ``dataset``, collect its Gram statistics, score
    it on a held-out slice and register it (as ``params.adapter``, default the domain)."""
    p, rt = validate(TrainParams, params, "train params"), get_runtime()
    name = p.adapter or domain
    steps.ensure_new_adapter(rt, name)
    job.phase(0.0, "prepare")
    model = new_adapter_model(rt, p)
    record, data = steps.dataset_tensors(rt, dataset, unwrap(model),
                                         max_samples=p.max_samples, seed=p.seed)
    train_set, holdout = split_holdout(data, p.holdout, p.seed)
    samples = {"train": len(train_set), "holdout": len(holdout), "dropped": data.dropped}
    adapter, metrics = train_and_register(job, rt, model, p, name, train_set, holdout, metadata={
        "domain": domain, "dataset": {"name": dataset, "sha256": record.sha256,
                                      "samples": samples}})
    return {"adapter": name, "sha256": adapter.sha256, "metrics": metrics, "samples": samples}


@job_task(MERGE)
def merge(job: JobHandle, adapters: list[str], method: str, params: dict[str, Any],
          activate: bool = False, fresh: bool = False) -> dict[str, Any]:
    """Fold ``adapters`` not yet in the latest version's merge state into it and store the
    merged adapter as a new version (made live if ``activate``)."""
    rt = get_runtime()
    # The lock is a lease renewed while this merge runs (it lapses soon after a dead worker);
    # the version is registered only if this merge still holds it (fence).
    with rt.registry.merge_lock(rt.settings.merge_lock_lease_s,
                                blocking_timeout_s=MERGE_LOCK_WAIT_S) as lock:
        job.phase(0.0, "prepare")
        parent, state = steps.start_state(rt, method, params, fresh)
        known: dict[str, str] = dict(parent.lineage.get("adapters", {})) if parent else {}
        todo = [name for name in adapters if name not in state.domains]
        steps.check_unchanged(rt, known, [name for name in adapters if name not in todo])
        scores = dict(parent.lineage.get("scores", {})) if parent else {}
        config, shas, new_scores = steps.fold_adapters(rt, state, todo, lambda i, name: job.phase(
            0.05 + 0.75 * i / len(todo), "fold", adapter=name))
        known.update(shas)
        scores.update(new_scores)
        if config is None:  # nothing new: the latest version already holds every adapter
            number = parent.number if parent else None
        else:
            job.phase(0.85, "store")
            number = steps.store_version(rt, state, config, {
                "parent": parent.number if parent else None, "domains": list(state.domains),
                "adapters": known, "method": method, "params": state.params.to_dict(),
                "job_id": job.id, "scores": scores}, fence=lock).number
        if activate and number is not None:
            rt.registry.activate(number)
    return {"version": number, "created": config is not None, "domains": list(state.domains),
            "folded": todo, "activated": activate and number is not None}


@job_task(EVALUATE)
def evaluate(job: JobHandle, datasets: list[str], version: int | None = None,
             adapter: str | None = None, params: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Score the base model, merged ``version`` or domain ``adapter`` on each dataset
    (mean IoU / Dice / MAE with fixed random point prompts; unless ``params.clicks`` is 0,
    the click protocol's IoU after 1/3/5/10 clicks and NoC@80/85/90 under ``clicks``)."""
    p, rt = validate(EvaluateParams, params, "evaluate params"), get_runtime()
    if version is not None:
        sam, target = unwrap(steps.load_version_model(rt, version)), f"version:{version}"
    elif adapter is not None:
        sam, target = unwrap(steps.load_adapter_model(rt, adapter)[1]), f"adapter:{adapter}"
    else:
        sam, target = rt.fresh_model(), "base"
    metrics: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(datasets):
        job.phase(i / len(datasets), "evaluate", dataset=name)
        metrics[name] = steps.evaluate_dataset(rt, name, sam, p, job.check_cancelled)
    return {"target": target, "metrics": metrics}


@job_task(STATS)
def stats(job: JobHandle, adapter: str, dataset: str, params: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    """Compute Gram statistics for ``adapter`` on calibration ``dataset`` and register the
    adapter with them as a NEW adapter (``params.output``; adapters are immutable)."""
    p, rt = validate(StatsParams, params, "stats params"), get_runtime()
    output = stats_output_name(adapter, p)
    steps.ensure_new_adapter(rt, output)
    job.phase(0.0, "prepare")
    record, model = steps.load_adapter_model(rt, adapter)
    job.phase(0.1, "stats")
    dataset_record, gram, samples = steps.dataset_gram_stats(rt, model, dataset, p,
                                                                job.check_cancelled)
    job.phase(0.9, "register")
    source = {"adapter": adapter, "sha256": record.sha256, "dataset": dataset,
              "dataset_sha256": dataset_record.sha256, "samples": samples, "job_id": job.id}
    new = steps.register_adapter(rt, model, output, stats=gram, metadata={
        **record.metadata, **steps.base_metadata(rt), "stats_from": source})
    return {"adapter": output, "source": adapter, "sha256": new.sha256, "samples": samples}
