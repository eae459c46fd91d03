"""``GET /v1/router``: the domain router behind ``adapter: "auto"`` in this API process."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.deps import EngineDep, require_segment_access
from service.api.problems import problem_responses
from service.api.schemas.routing import RouterInfo

router = APIRouter(prefix="/v1/router", tags=["segment"],
                   dependencies=[Depends(require_segment_access)])


@router.get("", response_model=RouterInfo, responses=problem_responses(401, 503))
def get_router(engine: EngineDep) -> RouterInfo:
    """The domains the router knows (registered adapters with statistics), those it leaves
    out and why, the layer it reads, its thresholds and a digest of its state."""
    return RouterInfo.of(engine.routing.state, engine.routing)
