"""``/v1/versions``: merged versions and the live pointer; activation (and rollback, which is
activating an older version) hot-swaps the serving model."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import AdminKey, RegistryDep, RuntimeDep
from service.live_swap import check_adapter_fits
from service.problems import problem_responses
from service.schemas.versions import (
    ActivateResponse,
    LiveVersionResponse,
    VersionInfo,
    VersionListResponse,
)

router = APIRouter(prefix="/v1/versions", tags=["versions"])


@router.get("", response_model=VersionListResponse, responses=problem_responses(503))
def list_versions(registry: RegistryDep) -> VersionListResponse:
    """Every merged version, oldest first, and the live one."""
    live = registry.live_version()
    return VersionListResponse(
        versions=[VersionInfo.of(r, live) for r in registry.list_versions()], live_version=live)


@router.get("/live", response_model=LiveVersionResponse, responses=problem_responses(503))
def live_version(runtime: RuntimeDep) -> LiveVersionResponse:
    """The live pointer and what this process serves (they differ only during a swap, or
    when the pointed version could not be loaded: see ``last_swap_error``)."""
    return LiveVersionResponse(live_version=runtime.registry.live_version(),
                               served_version=runtime.engine.live_version,
                               adapter_version=runtime.engine.live_label,
                               last_swap_error=runtime.live.last_error)


@router.get("/{number}", response_model=VersionInfo, responses=problem_responses(404, 503))
def get_version(number: int, registry: RegistryDep) -> VersionInfo:
    """One version's record."""
    return VersionInfo.of(registry.get_version(number), registry.live_version())


@router.post("/{number}/activate", response_model=ActivateResponse,
             responses=problem_responses(401, 403, 404, 422, 503))
def activate_version(_: AdminKey, number: int, runtime: RuntimeDep) -> ActivateResponse:
    """Make version ``number`` live everywhere (rolling back is activating an older one).

    The version is checked against the serving model first (422 and nothing changes if it
    does not fit); then the live pointer moves, every replica swaps, and this one has swapped
    before it answers.
    """
    registry = runtime.registry
    files = runtime.live.read_version(number)  # NotFound -> 404
    check_adapter_fits(runtime.settings.model, files, f"version {number}")
    previous = registry.live_version()
    record = registry.activate(number)
    swap = runtime.live.sync()
    return ActivateResponse(version=VersionInfo.of(record, record.number),
                            previous_version=previous,
                            served_version=runtime.engine.live_version,
                            swap_seconds=None if swap is None else swap.seconds)
