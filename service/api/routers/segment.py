"""``POST /v1/segment``: masks for a prompt on an image, with the adapter version that made
them (in the body and the ``X-Regcl-Adapter-Version`` header); ``POST /v1/segment/batch``:
several prompts on one image in one request and one decoder call per prompt form. With
``adapter: "auto"`` the body's ``route`` (and the ``X-Regcl-Route`` header) says what the
domain router chose and how confidently."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Depends, Response

from service.api.deps import RuntimeDep, require_segment_access
from service.api.problems import problem_responses
from service.api.routers.images import store_image
from service.api.runtime import Runtime
from service.api.schemas.routing import RouteInfo
from service.api.schemas.segment import (
    RLE,
    MaskResult,
    PromptMasks,
    SegmentBatchRequest,
    SegmentBatchResponse,
    SegmentOptions,
    SegmentRequest,
    SegmentResponse,
)
from service.api.uploads import decode_base64
from service.engine.adapter_table import AUTO, BASE, LIVE
from service.engine.decode import SegmentResult
from service.engine.errors import PromptShapeError
from service.engine.masks import mask_area, mask_bbox, mask_to_png, mask_to_rle

router = APIRouter(prefix="/v1/segment", tags=["segment"],
                   dependencies=[Depends(require_segment_access)])

VERSION_HEADER = "X-Regcl-Adapter-Version"
ROUTE_HEADER = "X-Regcl-Route"
_HEADERS = {200: {"headers": {
    VERSION_HEADER: {"description": "The adapter version that made the masks.",
                     "required": True, "schema": {"type": "string"}},
    ROUTE_HEADER: {"description": "adapter auto only: 'chosen=<domain or live>; best=<domain>; "
                   "margin=<number>; novelty=<number>'.", "schema": {"type": "string"}}}}}


def _mask_input(runtime: Runtime, text: str | None) -> np.ndarray | None:
    """``mask_input`` base64 → 1 x side x side float32 logits."""
    if text is None:
        return None
    side = runtime.mask_input_side
    size = 4 * side * side
    # A fixed size: a wrong length is a malformed prompt (422), never a too-large body (413).
    data = decode_base64(text, size + 2, "mask_input")
    if len(data) != size:
        raise PromptShapeError(f"mask_input must be {side} x {side} float32 values "
                               f"({size} bytes), got {len(data)} bytes")
    return np.frombuffer(data, dtype="<f4").reshape(1, side, side).astype(np.float32)


def _image_id(runtime: Runtime, body: SegmentOptions) -> str:
    """The request's image id; an inline image is stored first."""
    if body.image_base64 is not None:
        data = decode_base64(body.image_base64, runtime.settings.max_upload_bytes,
                             "image_base64")
        return store_image(runtime, data).image_id
    return body.image_id or ""


def _answered(runtime: Runtime, body: SegmentOptions, results: list[SegmentResult],
              response: Response) -> RouteInfo | None:
    """Count the segmentations, name the version (and for auto the route) in the headers;
    returns the route of an auto request."""
    kind = body.adapter if body.adapter in (BASE, LIVE, AUTO) else "domain"
    for result in results:
        runtime.metrics.segments.labels(kind, "hit" if result.cache_hit else "miss").inc()
    response.headers[VERSION_HEADER] = results[0].adapter_version
    chosen = results[0].route
    if chosen is None:
        return None
    route = RouteInfo.of(chosen, results[0].adapter_version, runtime.engine.routing)
    response.headers[ROUTE_HEADER] = route.header()
    return route


def _masks(result: SegmentResult, body: SegmentOptions) -> list[MaskResult]:
    return [_mask_result(result, i, body) for i in range(result.masks.shape[0])]


def _mask_result(result: SegmentResult, index: int, body: SegmentOptions) -> MaskResult:
    mask = result.masks[index]
    out = MaskResult(score=float(result.scores[index]), area=mask_area(mask),
                     bbox=tuple(mask_bbox(mask)))
    if body.format == "png":
        out.png = base64.b64encode(mask_to_png(mask)).decode("ascii")
    else:
        out.rle = RLE.model_validate(mask_to_rle(mask))
    if body.return_logits:
        logits = np.ascontiguousarray(result.low_res_logits[index], dtype="<f4")
        out.low_res_logits = base64.b64encode(logits.tobytes()).decode("ascii")
    return out


@router.post("", response_model=SegmentResponse,
             responses={**problem_responses(400, 401, 404, 413, 422, 503), **_HEADERS})
def segment(body: SegmentRequest, runtime: RuntimeDep, response: Response) -> SegmentResponse:
    """Segment an uploaded (``image_id``) or inline (``image_base64``) image with points,
    a box and/or an earlier mask's logits, using the ``live`` adapter (default), the ``base``
    model, an uploaded adapter by name, or ``auto`` (the domain router picks an uploaded
    adapter from the image, else ``live`` serves; ``route`` says which and how sure)."""
    image_id = _image_id(runtime, body)
    mask_input = _mask_input(runtime, body.mask_input)
    result = runtime.engine.segment(image_id, body.points, body.labels, body.box, mask_input,
                                    body.multimask, body.adapter)
    route = _answered(runtime, body, [result], response)
    return SegmentResponse(masks=_masks(result, body), adapter_version=result.adapter_version,
                           image_id=result.image_id, cache_hit=result.cache_hit, route=route)


@router.post("/batch", response_model=SegmentBatchResponse,
             responses={**problem_responses(400, 401, 404, 413, 422, 503), **_HEADERS})
def segment_batch(body: SegmentBatchRequest, runtime: RuntimeDep,
                  response: Response) -> SegmentBatchResponse:
    """Several prompts (up to 64) on one image: one encode (or cache hit), and one
    mask-decoder call for each group of prompts of the same form (same number of points, box
    or not, mask_input or not). One bad prompt refuses the whole request, with its problem
    type. Results come back in the prompts' order."""
    image_id = _image_id(runtime, body)
    prompts = [{"point_coords": p.points, "point_labels": p.labels, "box": p.box,
                "mask_input": _mask_input(runtime, p.mask_input)} for p in body.prompts]
    results = runtime.engine.segment_many(image_id, prompts, body.multimask, body.adapter)
    route = _answered(runtime, body, results, response)
    first = results[0]
    return SegmentBatchResponse(results=[PromptMasks(masks=_masks(r, body)) for r in results],
                                adapter_version=first.adapter_version, image_id=first.image_id,
                                cache_hit=first.cache_hit, route=route)
