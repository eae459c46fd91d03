"""Each domain's held-out samples, found again from what its adapter recorded, and scores on
them: what the guarded activation of :mod:`workers.continual` compares. Worker side only."""

from __future__ import annotations

import logging

from segment_anything.modeling import Sam

from infra.errors import NotFound
from infra.registry import AdapterRecord
from regcl.errors import ConfigError, DataError
from regcl.evaluation.evaluate import evaluate_points
from workers import steps
from workers.params import TrainParams, validate
from workers.prepare import DomainTensors, split_holdout
from workers.runtime import WorkerRuntime

__all__ = ["domain_of", "heldout_tensors", "iou_on"]

logger = logging.getLogger(__name__)


def domain_of(record: AdapterRecord) -> str:
    """The domain an adapter was made for (its metadata's ``domain``, else its name)."""
    domain = record.metadata.get("domain")
    return domain if isinstance(domain, str) and domain else record.name


def heldout_tensors(rt: WorkerRuntime, record: AdapterRecord, sam: Sam, max_samples: int
                    ) -> DomainTensors | None:
    """The held-out samples of the domain ``record``'s adapter was trained for (at most
    ``max_samples``, seeded): a continual step's held-out dataset (``heldout_dataset`` in its
    metadata), or a train job's held-out slice of its dataset rebuilt exactly as that job
    split it. None when there is none to find: an uploaded adapter, or a dataset deleted or
    replaced since."""
    meta = record.metadata
    try:
        if isinstance(meta.get("heldout_dataset"), str):
            return steps.dataset_tensors(rt, meta["heldout_dataset"], sam,
                                         max_samples=max_samples, seed=0)[1]
        source = meta.get("dataset")
        if not isinstance(source, dict) or not isinstance(source.get("name"), str):
            return None
        if rt.datasets.get_dataset(source["name"]).sha256 != source.get("sha256"):
            logger.info("adapter %s: dataset %s changed since training; no held-out set",
                        record.name, source["name"])
            return None
        p = validate(TrainParams, meta.get("train"), f"train params of adapter {record.name}")
        _, data = steps.dataset_tensors(rt, source["name"], sam, max_samples=p.max_samples,
                                        seed=p.seed)
        holdout = split_holdout(data, p.holdout, p.seed)[1]
    except (NotFound, ConfigError, DataError) as exc:
        logger.info("adapter %s: no held-out set (%s)", record.name, exc)
        return None
    return holdout if len(holdout) <= max_samples else holdout.subset(range(max_samples))


def iou_on(sam: Sam, data: DomainTensors, seed: int, n_points: int) -> float:
    """Mean IoU of ``sam`` on ``data`` with the evaluation protocol's point prompts."""
    return evaluate_points(sam, data.images, data.masks, seed=seed, n_points=n_points)["iou"]
