"""The continual step of one domain (a Label Studio project), with guarded activation.

snapshot the domain's sample set (train / held-out datasets) → train the domain's adapter
(``<domain>-s<n>``) with its Gram statistics → fold it into the **live** version's merge state
(a domain trained before is replaced: the state is rebuilt from the live adapters without its
old one) → store the result as a candidate version → score live and candidate on this
domain's held-out set and on every other live domain's → activate the candidate only if
:func:`regcl.evaluation.gate.guarded_activation` says so → score the new adapter alone
against the live version the step leaves, on the same held-out set: if it is better, it
serves the domain's Label Studio projects from now (:mod:`infra.project_serving`; a step whose
adapter is not better leaves them on what served them). Worker side only (imports torch).

A rerun of the job (its worker died; :mod:`workers.reaper`) takes up what the dead attempt
made rather than making it twice: the snapshot is the one reserved under the job's id, the
adapter ``<domain>-s<n>`` registered by this job is loaded instead of trained again, the
version whose lineage names this job is the candidate, the gate's decision is written once
(``keys.job_gate``) and read back, a candidate already live was activated by this job, and the
serving record is written once per job (:meth:`ProjectServing.record`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from infra import keys
from infra.errors import NotFound
from infra.project_serving import ProjectServing, ServingCheck
from infra.registry import AdapterRecord, MergeLockLost, VersionRecord
from infra.sample_sets import SampleSets
from regcl.adapters import unwrap
from regcl.errors import MergeError
from regcl.evaluation.gate import guarded_activation
from regcl.merging import ContinualMergeState
from workers import steps
from workers.celery_app import CONTINUAL
from workers.heldout import domain_of, heldout_tensors, iou_on
from workers.params import DEFAULT_MERGE_METHOD, ContinualParams, method_params_type, validate
from workers.prepare import DomainTensors
from workers.protocol import JobHandle, job_task
from workers.runtime import WorkerRuntime, get_runtime
from workers.tasks import MERGE_LOCK_WAIT_S
from workers.train_step import new_adapter_model, train_and_register

__all__ = ["GATE_RECORD_TTL_S", "MERGE_TRIES", "continual"]

logger = logging.getLogger(__name__)

MERGE_TRIES = 2
"""A merge whose lock lapsed under it (nothing registered) is done again, from the live version
then, this many times in all."""

GATE_RECORD_TTL_S = 30 * 24 * 3600
"""How long a step's gate decision is kept for a rerun of its job (reruns come within leases)."""


@job_task(CONTINUAL)
def continual(job: JobHandle, domain: str, project: int | None, params: dict[str, Any]
              ) -> dict[str, Any]:
    """One continual step of ``domain`` (see the module doc); the result says whether the
    candidate went live and, check by check, why."""
    p, rt = validate(ContinualParams, params, "continual params"), get_runtime()
    job.phase(0.0, "snapshot")
    with rt.scratch_dir() as tmp:
        snap = SampleSets(rt.redis, rt.store, rt.datasets).snapshot(
            domain, seed=p.seed, holdout=p.holdout, work_dir=tmp,
            metadata={"project": project, "job_id": job.id}, key=job.id)
    name = f"{domain}-s{snap.seq}"
    earlier = _registered_by(rt, name, job.id)
    model = (new_adapter_model(rt, p.train) if earlier is None
             else steps.load_adapter_model(rt, name)[1])
    _, train_set = steps.dataset_tensors(rt, snap.train.name, unwrap(model),
                                         max_samples=p.train.max_samples, seed=p.train.seed)
    _, holdout = steps.dataset_tensors(rt, snap.heldout.name, unwrap(model),
                                       max_samples=p.eval_samples, seed=0)
    samples = {"train": len(train_set), "heldout": len(holdout)}
    if earlier is None:
        trained, metrics = train_and_register(
            job, rt, model, p.train, name, train_set, holdout, metadata={
                "domain": domain, "project": project, "heldout_dataset": snap.heldout.name,
                "dataset": {"name": snap.train.name, "sha256": snap.train.sha256,
                            "samples": samples}},
            span=(0.05, 0.6))
    else:
        logger.info("job %s: adapter %s was trained by an earlier attempt; reused", job.id, name)
        trained, metrics = earlier, dict(earlier.metadata["metrics"])
    candidate, live, replaced = _candidate(job, rt, domain, name, p)
    job.phase(0.8, "gate", version=candidate.number)
    gate, own, unchecked = _decide(job, rt, p, domain, candidate, live, holdout)
    activated, gate = _activate(rt, gate, candidate.number, live)
    job.phase(0.95, "serving")
    after = candidate.number if activated else live  # the live version the step leaves
    check = ServingCheck(name, trained.sha256,
                         iou_on(unwrap(model), holdout, p.seed, p.n_points),
                         "base" if after is None else f"live:{after}",
                         own[1] if activated else own[0], len(holdout), job.id)
    serving = ProjectServing(rt.redis).record(domain, check)
    stored = serving.last_check or check  # an earlier attempt's, if it wrote it
    return {"domain": domain, "project": project, "adapter": name,
            "snapshot": {"seq": snap.seq, "train": snap.train.name,
                         "heldout": snap.heldout.name, "annotations": snap.annotations,
                         "samples": samples},
            "metrics": {k: metrics[k] for k in ("holdout", "holdout_base")},
            "version": candidate.number, "live_before": live, "replaced": replaced,
            "activated": activated, "gate": gate, "unchecked_domains": unchecked,
            "serving": {"check": stored.to_dict(), "adapter": serving.adapter}}


def _registered_by(rt: WorkerRuntime, name: str, job_id: str) -> AdapterRecord | None:
    """Adapter ``name`` if this job registered it (an earlier attempt); None if there is no
    such adapter; Conflict if another job or an upload made it."""
    record = _adapter_record(rt, name)
    if record is not None and record.metadata.get("job_id") == job_id:
        return record
    steps.ensure_new_adapter(rt, name)
    return None


def _candidate(job: JobHandle, rt: WorkerRuntime, domain: str, adapter: str,
               p: ContinualParams) -> tuple[VersionRecord, int | None, list[str]]:
    """The candidate version (stored now, or by an earlier attempt of this job), the live
    version it was built on and the adapters of ``domain`` it replaced."""
    for version in reversed(rt.registry.list_versions()):
        if version.lineage.get("job_id") == job.id:
            logger.info("job %s: candidate version %d was stored by an earlier attempt; "
                        "reused", job.id, version.number)
            return (version, version.lineage.get("parent"),
                    list(version.lineage.get("replaced", [])))
    for tries_left in range(MERGE_TRIES - 1, -1, -1):
        live = rt.registry.live_version()
        try:
            candidate, replaced = _merge_candidate(job, rt, live, domain, adapter, p)
        except MergeLockLost as exc:  # e.g. Redis away longer than the lock's lease
            if not tries_left:
                raise
            logger.warning("job %s: %s; merging again", job.id, exc)
            continue
        return candidate, live, replaced
    raise AssertionError("unreachable")  # pragma: no cover


def _decide(job: JobHandle, rt: WorkerRuntime, p: ContinualParams, domain: str,
            candidate: VersionRecord, live: int | None, holdout: DomainTensors
            ) -> tuple[dict[str, Any], list[float], list[str]]:
    """The gate's decision on ``candidate``, (live IoU, candidate IoU, samples) on this
    domain's held-out set and the domains it could not check: what an earlier attempt of this
    job wrote, else scored now and written (once: the first written stands)."""
    key = keys.job_gate(job.id)
    if (raw := rt.redis.get(key)) is None:
        gate, own, unchecked = _score(job, rt, p, domain, candidate, live, holdout)
        rt.redis.set(key, json.dumps({"gate": gate, "own": own, "unchecked": unchecked},
                                     allow_nan=False), nx=True,
                     ex=GATE_RECORD_TTL_S)
        raw = rt.redis.get(key)
    else:
        logger.info("job %s: the gate was decided by an earlier attempt", job.id)
    decided = json.loads(raw)
    return decided["gate"], list(decided["own"]), list(decided["unchecked"])


def _score(job: JobHandle, rt: WorkerRuntime, p: ContinualParams, domain: str,
           candidate: VersionRecord, live: int | None, holdout: DomainTensors
           ) -> tuple[dict[str, Any], list[float], list[str]]:
    """Score live and ``candidate`` (see the module doc) and ask the gate."""
    live_sam = (unwrap(steps.load_version_model(rt, live)) if live is not None
                else rt.fresh_model())
    cand_sam = unwrap(steps.load_version_model(rt, candidate.number))
    own = (iou_on(live_sam, holdout, p.seed, p.n_points),
           iou_on(cand_sam, holdout, p.seed, p.n_points), len(holdout))
    others, unchecked = {}, []
    for adapter in candidate.lineage["domains"]:
        record = _adapter_record(rt, adapter)
        other = adapter if record is None else domain_of(record)
        if other == domain:
            continue
        data = None if record is None else heldout_tensors(rt, record, cand_sam,
                                                             p.eval_samples)
        if data is None:  # an uploaded adapter, a deleted dataset: nothing to score on
            unchecked.append(other)
            continue
        job.check_cancelled()
        others[other] = (iou_on(live_sam, data, p.seed, p.n_points),
                         iou_on(cand_sam, data, p.seed, p.n_points), len(data))
    gate = guarded_activation(domain, own, others, p.tolerance).to_dict()
    return gate, list(own), unchecked


def _activate(rt: WorkerRuntime, gate: dict[str, Any], number: int, live: int | None
              ) -> tuple[bool, dict[str, Any]]:
    """Activate candidate ``number`` if the gate passed and ``live`` is still live (or say
    it is live already: an earlier attempt of this job activated it)."""
    now = rt.registry.live_version()
    if not gate["passed"]:
        return False, gate
    if now == number:
        return True, gate
    if now == live:
        rt.registry.activate(number)
        return True, gate
    return False, {**gate, "reason": f"not activated: version {now} went live while this "
                                      f"step ran (the candidate was built on {live})"}


def _live_state(rt: WorkerRuntime, live: int | None, method: str | None
                ) -> tuple[ContinualMergeState, dict[str, Any]]:
    """The live version's merge state and lineage, or an empty state (``method``, else the
    default) when nothing is live."""
    if live is None:
        method = method or DEFAULT_MERGE_METHOD
        defaults = validate(method_params_type(method), {}, f"{method} parameters")
        return ContinualMergeState(method, **defaults.model_dump()), {}
    record = rt.registry.get_version(live)
    steps.check_base(rt, record.lineage, f"version {live}")
    local = rt.registry.fetch_version(live, rt.cache_dir / "versions")
    return ContinualMergeState.load(local / record.state_file), dict(record.lineage)


def _merge_candidate(job: JobHandle, rt: WorkerRuntime, live: int | None, domain: str,
                     adapter: str, p: ContinualParams) -> tuple[VersionRecord, list[str]]:
    """Store live + ``adapter`` as a new version (not activated). Returns it and the older
    adapters of ``domain`` it replaced."""
    with rt.registry.merge_lock(rt.settings.merge_lock_lease_s,
                                blocking_timeout_s=MERGE_LOCK_WAIT_S) as lock:
        job.phase(0.6, "merge")
        state, lineage = _live_state(rt, live, p.method)
        folded = list(state.domains)
        replaced = [a for a in folded if _adapter_domain(rt, a) == domain]
        known = dict(lineage.get("adapters", {}))
        scores = dict(lineage.get("scores", {}))
        if replaced or (p.method is not None and p.method != state.method):
            # A fold cannot be undone: rebuild from the live adapters, without the old one.
            method = p.method or state.method
            params = state.params.to_dict() if method == state.method else validate(
                method_params_type(method), {}, f"{method} parameters").model_dump()
            state = ContinualMergeState(method, **params)
            todo = [a for a in folded if a not in replaced] + [adapter]
            known, scores = {}, {}
        else:
            todo = [adapter]
        config, shas, new_scores = steps.fold_adapters(rt, state, todo, lambda i, name: job.phase(
            0.6 + 0.15 * i / len(todo), "fold", adapter=name))
        if config is None:  # pragma: no cover - todo always holds the new adapter
            raise MergeError("nothing to merge")
        known.update(shas)
        scores.update(new_scores)
        job.phase(0.75, "store")
        version = steps.store_version(rt, state, config, {
            "parent": live, "domains": list(state.domains), "adapters": known,
            "method": state.method, "params": state.params.to_dict(), "job_id": job.id,
            "scores": scores, "candidate_for": domain, "replaced": replaced}, fence=lock)
    return version, replaced


def _adapter_record(rt: WorkerRuntime, name: str) -> AdapterRecord | None:
    try:
        return rt.registry.get_adapter(name)
    except NotFound:  # deleted since it was folded: it keeps its place in the state
        return None


def _adapter_domain(rt: WorkerRuntime, name: str) -> str:
    record = _adapter_record(rt, name)
    return name if record is None else domain_of(record)
