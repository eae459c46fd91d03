"""Training one domain adapter and registering it: what the ``train`` job and the continual
step (:mod:`workers.continual`) share. Worker side only (imports torch)."""

from __future__ import annotations

from typing import Any

from peft import PeftModel

from infra.registry import AdapterRecord
from regcl.adapters import AdapterConfig, attach_lora
from workers import steps
from workers.params import TrainParams
from workers.prepare import DomainTensors
from workers.protocol import JobHandle
from workers.runtime import WorkerRuntime

__all__ = ["new_adapter_model", "train_and_register"]


def new_adapter_model(rt: WorkerRuntime, p: TrainParams) -> PeftModel:
    """A fresh copy of the base model with an untrained LoRA adapter laid out as ``p`` says,
    its initial weights drawn from ``p.seed`` (not from torch's global generator, whose state
    depends on what the worker process ran before): one job's parameters, one adapter."""
    return attach_lora(rt.fresh_model(), AdapterConfig(
        rank=p.rank, alpha=p.alpha, blocks=None if p.blocks is None else tuple(p.blocks)),
        seed=p.seed)


def train_and_register(job: JobHandle, rt: WorkerRuntime, model: PeftModel, p: TrainParams,
                       name: str, train_set: DomainTensors, holdout: DomainTensors, *,
                       metadata: dict[str, Any], span: tuple[float, float] = (0.05, 0.95)
                       ) -> tuple[AdapterRecord, dict[str, Any]]:
    """Train ``model``'s adapter on ``train_set``, collect its Gram statistics, score it on
    ``holdout`` (with and without the adapter) and register it as ``name`` with
    ``metadata`` + the metrics. Progress runs over ``span`` of the job. Returns the record
    and the metrics."""
    stats, metrics = steps.fit_adapter(model, train_set, holdout, p, job, span)
    job.phase(span[1], "register")
    record = steps.register_adapter(rt, model, name, stats=stats, metadata={
        **metadata, **steps.base_metadata(rt), "metrics": metrics, "train": p.model_dump(),
        "job_id": job.id})
    return record, metrics
