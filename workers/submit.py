"""Submitting jobs to the workers: the surface the HTTP API uses (imports no torch).

Each ``submit_*`` validates its arguments (:class:`~regcl.errors.ConfigError` on bad values, and
nothing is recorded then), records a queued job in the :class:`~infra.jobs.JobStore` (its
``params`` are the job's full arguments), then sends the Celery task with ``task_id`` = the job
id. Follow the job with ``JobStore.get`` / the pub/sub events of :mod:`infra.jobs`.

What is *not* checked here is existence (of datasets, adapters, versions): that is the
worker's to find out, and the job then fails with ``NotFound``. An API that wants an early 404
can look the names up in the registries before submitting.

Results (``JobRecord.result`` once succeeded):

- train: ``{"adapter": name, "sha256", "metrics": {"holdout": {iou, dice, mae},
  "holdout_base": {...}, "train": [per-epoch history]}, "samples": {"train": n, "holdout": n}}``
- merge: ``{"version": n, "created": bool, "domains": [...], "folded": [...],
  "activated": bool}`` (``created`` is false when every adapter was already in the latest
  version: nothing new is made)
- evaluate: ``{"target": "base" | "version:3" | "adapter:polyp", "metrics": {dataset:
  {iou, dice, mae, count}}}``
- stats: ``{"adapter": new name, "source": adapter, "sha256", "samples": n}``
- continual: ``{"domain", "project", "snapshot": {"seq", "train", "heldout", "samples"},
  "adapter", "version": candidate n, "live_before": n | None, "activated": bool,
  "gate": {"passed", "tolerance", "reason", "failed": [...], "checks": [{"check":
  "improves" | "keeps", "domain", "live", "candidate", "change", "samples", "passed"}]}}``
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from infra.jobs import JobRecord, JobState, JobStore
from infra.names import validate_name
from regcl.errors import ConfigError, RegclError
from workers.celery_app import CONTINUAL, EVALUATE, MERGE, QUEUE_OF, STATS, TRAIN
from workers.params import (
    DEFAULT_MERGE_METHOD,
    ContinualParams,
    EvaluateParams,
    MergeJob,
    MergeJobParams,
    StatsParams,
    TrainParams,
    check_dataset_names,
    stats_output_name,
    validate,
)

__all__ = [
    "EnqueueError",
    "cancel_job",
    "submit_continual",
    "submit_evaluate",
    "submit_merge",
    "submit_stats",
    "submit_train",
]

logger = logging.getLogger(__name__)


class EnqueueError(RegclError, RuntimeError):
    """The job was recorded but the broker did not take it (Redis down?); the job is failed."""


def _adapter_name(name: Any, what: str, *, new: bool = False) -> str:
    try:
        return validate_name(name, "adapter name", new=new)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def submit_train(celery: Celery, jobs: JobStore, *, dataset: str, domain: str,
                 params: dict[str, Any] | None = None) -> JobRecord:
    """Train a LoRA adapter for ``domain`` on dataset ``dataset`` (:class:`TrainParams`);
    it is registered as ``params["adapter"]`` (default: the domain name)."""
    (dataset,) = check_dataset_names([dataset])
    domain = _adapter_name(domain, "domain", new=True)  # by default, also the adapter's name
    train = validate(TrainParams, params, "train params")
    return _enqueue(celery, jobs, "train", TRAIN, {
        "dataset": dataset, "domain": domain, "params": train.model_dump()})


def submit_merge(celery: Celery, jobs: JobStore, *, adapters: list[str],
                 method: str = DEFAULT_MERGE_METHOD,
                 params: dict[str, Any] | None = None, activate: bool = False,
                 fresh: bool = False) -> JobRecord:
    """Fold ``adapters`` (in order) into the latest version's merge state and store the
    result as a new version (made live if ``activate``). ``params``: the merge method's
    parameters (``regcl``: ridge, alpha). ``fresh``: start from an empty state."""
    merge: MergeJob = validate(MergeJobParams, {
        "adapters": adapters, "method": method, "params": params, "activate": activate,
        "fresh": fresh}, "merge job")
    return _enqueue(celery, jobs, "merge", MERGE, {
        "adapters": merge.adapters, "method": merge.method, "params": merge.method_params(),
        "activate": merge.activate, "fresh": merge.fresh})


def submit_evaluate(celery: Celery, jobs: JobStore, *, datasets: list[str],
                    version: int | None = None, adapter: str | None = None,
                    params: dict[str, Any] | None = None) -> JobRecord:
    """Score merged ``version``, or domain ``adapter``, or (neither) the base model, on each of
    ``datasets`` (:class:`EvaluateParams`)."""
    datasets = check_dataset_names(datasets)
    if version is not None and adapter is not None:
        raise ConfigError("evaluate either a version or an adapter, not both")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or version < 1):
        raise ConfigError(f"version must be a positive int, got {version!r}")
    if adapter is not None:
        adapter = _adapter_name(adapter, "adapter")
    evaluate = validate(EvaluateParams, params, "evaluate params")
    return _enqueue(celery, jobs, "evaluate", EVALUATE, {
        "datasets": datasets, "version": version, "adapter": adapter,
        "params": evaluate.model_dump()})


def submit_stats(celery: Celery, jobs: JobStore, *, adapter: str, dataset: str,
                 params: dict[str, Any] | None = None) -> JobRecord:
    """Compute Gram statistics for ``adapter`` (e.g. one uploaded without them) on calibration
    dataset ``dataset``. Adapters are immutable, so the result is a NEW adapter (``params
    ["output"]``, default ``<adapter>-stats``) with the same weights plus statistics."""
    adapter = _adapter_name(adapter, "adapter")
    (dataset,) = check_dataset_names([dataset])
    stats = validate(StatsParams, params, "stats params")
    output = stats_output_name(adapter, stats)
    return _enqueue(celery, jobs, "stats", STATS, {
        "adapter": adapter, "dataset": dataset,
        "params": stats.model_copy(update={"output": output}).model_dump()})


def submit_continual(celery: Celery, jobs: JobStore, *, domain: str, project: int | None,
                     params: dict[str, Any] | None = None) -> JobRecord:
    """A continual step of ``domain``'s sample set (:class:`ContinualParams`): snapshot →
    train → merge into live as a candidate → guarded activation."""
    domain = _adapter_name(domain, "domain")
    step = validate(ContinualParams, params, "continual params")
    return _enqueue(celery, jobs, "continual", CONTINUAL, {
        "domain": domain, "project": project, "params": step.model_dump()})


def cancel_job(celery: Celery, jobs: JobStore, job_id: str) -> JobRecord:
    """Cancel a job: a queued one is cancelled at once (and revoked, so a worker that already
    holds it drops it); a running one is flagged and stops at its next check, then turns
    ``cancelled``. NotFound for unknown ids; Conflict if the job has already finished."""
    record = jobs.request_cancel(job_id)
    if record.state is JobState.CANCELLED:
        try:
            celery.control.revoke(job_id)
        except Exception:  # best effort: a worker refuses a cancelled job when it starts it
            logger.warning("revoking job %s failed; the worker will skip it anyway", job_id,
                           exc_info=True)
    return record


def _enqueue(celery: Celery, jobs: JobStore, kind: str, task: str,
             kwargs: dict[str, Any]) -> JobRecord:
    job_id = jobs.create(kind, kwargs)
    try:
        celery.send_task(task, kwargs={"job_id": job_id, **kwargs}, task_id=job_id,
                         queue=QUEUE_OF[task])
    except Exception as exc:
        logger.exception("could not enqueue job %s (%s)", job_id, kind)
        try:
            jobs.fail(job_id, "EnqueueError", f"the job could not be queued: {exc}")
        except Exception:
            logger.exception("could not mark job %s failed", job_id)
        raise EnqueueError(f"job {job_id} could not be queued: {exc}") from exc
    logger.info("job %s (%s) sent", job_id, kind)
    return jobs.get(job_id)
