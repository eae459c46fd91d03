"""``/v1/versions``: merged versions and the live pointer; activation (and rollback, which is
activating an older version) hot-swaps the serving model."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from infra.jobs import JobRecord, JobState
from service.api.deps import (
    AdminKey,
    DatasetsDep,
    EngineDep,
    JobStoreDep,
    LiveDep,
    RegistryDep,
    SettingsDep,
)
from service.api.problems import problem_responses
from service.api.schemas.documented import VersionPath
from service.api.schemas.versions import (
    ActivateResponse,
    ContinualMatrixResponse,
    LiveVersionResponse,
    MatrixCell,
    MatrixColumn,
    MatrixRow,
    VersionInfo,
    VersionListResponse,
)
from service.engine.live_swap import check_adapter_fits

router = APIRouter(prefix="/v1/versions", tags=["versions"])


@router.get("", response_model=VersionListResponse, responses=problem_responses(503))
def list_versions(registry: RegistryDep) -> VersionListResponse:
    """Every merged version, oldest first, and the live one."""
    live = registry.live_version()
    return VersionListResponse(
        versions=[VersionInfo.of(r, live) for r in registry.list_versions()], live_version=live)


@router.get("/live", response_model=LiveVersionResponse, responses=problem_responses(503))
def live_version(registry: RegistryDep, engine: EngineDep, live: LiveDep
                 ) -> LiveVersionResponse:
    """The live pointer and what this process serves (they differ only during a swap, or
    when the pointed version could not be loaded: see ``last_swap_error``)."""
    return LiveVersionResponse(live_version=registry.live_version(),
                               served_version=engine.adapters.live_version,
                               adapter_version=engine.adapters.live_label,
                               last_swap_error=live.last_error)


def _target_row(target: str, live: int | None) -> MatrixRow | None:
    kind, _, name = target.partition(":")
    if target == "base":
        return MatrixRow(target=target, scores={})
    if kind == "version" and name.isdigit():
        return MatrixRow(target=target, version=int(name), live=int(name) == live, scores={})
    if kind == "adapter" and name:
        return MatrixRow(target=target, adapter=name, scores={})
    return None


def _cell(job: JobRecord, metrics: Any) -> MatrixCell | None:
    if not isinstance(metrics, dict) or not isinstance(metrics.get("iou"), int | float):
        return None
    return MatrixCell(iou=metrics["iou"], dice=metrics.get("dice"), mae=metrics.get("mae"),
                      count=metrics.get("count"), job_id=job.id, finished_at=job.finished_at)


def _row_order(row: MatrixRow) -> tuple[int, int, str]:
    if row.version is not None:
        return (1, row.version, "")
    return (0, 0, "") if row.adapter is None else (2, 0, row.adapter)


@router.get("/matrix", response_model=ContinualMatrixResponse, responses=problem_responses(
    422, 503))
def continual_matrix(registry: RegistryDep, jobs: JobStoreDep, datasets: DatasetsDep,
                     limit: Annotated[int, Query(ge=1, le=1000, description="How many of "
                                                 "the newest evaluation jobs to read.")] = 1000
                     ) -> ContinualMatrixResponse:
    """The continual matrix: for the base model, each version and each adapter evaluated, its
    newest IoU on each dataset (from the succeeded ``evaluate`` jobs on record; read-only)."""
    live = registry.live_version()
    rows: dict[str, MatrixRow] = {}
    scanned = 0
    for job in jobs.list(kind="evaluate", limit=limit):  # newest first: first seen wins
        result = job.result
        if job.state != JobState.SUCCEEDED or not isinstance(result, dict):
            continue
        scanned += 1
        target, metrics = result.get("target"), result.get("metrics")
        if not isinstance(target, str) or not isinstance(metrics, dict):
            continue
        cells = {name: cell for name, values in metrics.items()
                 if (cell := _cell(job, values)) is not None}
        row = rows.get(target) or _target_row(target, live)
        if row is None or not cells:
            continue
        rows[target] = row
        for dataset, cell in cells.items():
            row.scores.setdefault(dataset, cell)
    names = sorted({name for row in rows.values() for name in row.scores})
    return ContinualMatrixResponse(columns=_columns(names, registry, datasets),
                                   rows=sorted(rows.values(), key=_row_order),
                                   live_version=live, jobs_scanned=scanned)


def _columns(names: list[str], registry: RegistryDep, datasets: DatasetsDep
             ) -> list[MatrixColumn]:
    """Each dataset with its domain: the dataset's own ``domain`` metadata, else the domain of
    an adapter trained on it."""
    trained_on: dict[str, str] = {}
    for adapter in registry.list_adapters():
        source, domain = adapter.metadata.get("dataset"), adapter.metadata.get("domain")
        if isinstance(source, dict) and isinstance(domain, str):
            trained_on.setdefault(str(source.get("name")), domain)
    known = {record.name: record.metadata.get("domain") for record in datasets.list_datasets()}
    columns = []
    for name in names:
        domain = known.get(name)
        columns.append(MatrixColumn(dataset=name, domain=domain if isinstance(domain, str)
                                    else trained_on.get(name)))
    return columns


@router.get("/{number}", response_model=VersionInfo, responses=problem_responses(404, 503))
def get_version(number: VersionPath, registry: RegistryDep) -> VersionInfo:
    """One version's record."""
    return VersionInfo.of(registry.get_version(number), registry.live_version())


@router.post("/{number}/activate", response_model=ActivateResponse,
             responses=problem_responses(401, 403, 404, 422, 503))
def activate_version(_: AdminKey, number: VersionPath, registry: RegistryDep, live: LiveDep,
                     settings: SettingsDep, engine: EngineDep) -> ActivateResponse:
    """Make version ``number`` live everywhere (rolling back is activating an older one).

    The version is checked against the serving model first (422 and nothing changes if it
    does not fit); then the live pointer moves, every replica swaps, and this one has swapped
    before it answers.
    """
    files = live.read_version(number)  # NotFound -> 404
    check_adapter_fits(settings.model, files, f"version {number}")
    previous = registry.live_version()
    record = registry.activate(number)
    swap = live.sync()
    return ActivateResponse(version=VersionInfo.of(record, record.number),
                            previous_version=previous,
                            served_version=engine.adapters.live_version,
                            swap_seconds=None if swap is None else swap.seconds)
