"""``GET /v1/models/decoder.onnx``: the served model's prompt encoder and mask decoder as
ONNX (segment-anything's ``SamOnnxModel`` export), for clients that decode masks from
``GET /v1/images/{image_id}/embedding`` themselves (the web page, with onnxruntime-web).
One file serves every adapter version: adapters only touch the image encoder
(:mod:`service.engine.onnx_export`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Response
from fastapi.concurrency import run_in_threadpool

from service.api.deps import RuntimeDep, require_segment_access
from service.api.problems import problem_responses

router = APIRouter(prefix="/v1/models", tags=["models"],
                   dependencies=[Depends(require_segment_access)])

ONNX_MEDIA_TYPE = "application/octet-stream"
CACHE_CONTROL = "public, max-age=3600"

_HEADERS: dict[str, Any] = {
    "ETag": {"description": "The base model's fingerprint and the ONNX opset (quoted).",
             "schema": {"type": "string"}, "required": True},
    "Cache-Control": {"schema": {"type": "string", "enum": [CACHE_CONTROL]}, "required": True},
}
_DESCRIPTION = """\
An ONNX model (opset 17). Inputs: `image_embeddings` float32 1 x C x h x w (from the
embedding route), `point_coords` float32 1 x N x 2 (x, y in the resized frame: pixel x
the input size over the original size, see `X-Regcl-Input-Size`), `point_labels` float32
1 x N (1 positive, 0 negative, 2 and 3 a box's corners, -1 the padding point that ends a
prompt without a box), `mask_input` float32 1 x 1 x 4h x 4w, `has_mask_input` float32 [1],
`orig_im_size` float32 [H, W]. Outputs: `masks` 1 x 4 x H x W logits (> 0 is the object;
index 0 is the single-mask answer, 1-3 the multimask ones), `iou_predictions` 1 x 4,
`low_res_masks` 1 x 4 x 4h x 4w."""


@router.get("/decoder.onnx", response_class=Response, response_model=None,
            responses={200: {"description": _DESCRIPTION,
                             "content": {ONNX_MEDIA_TYPE: {"schema": {"type": "string",
                                                                      "format": "binary"}}},
                             "headers": _HEADERS},
                       304: {"description": "The file named by If-None-Match is current.",
                             "headers": _HEADERS},
                       **problem_responses(401, 409)})
async def decoder_onnx(runtime: RuntimeDep, if_none_match: Annotated[str | None, Header(
        description="An ETag this endpoint gave: 304 if still current.")] = None
                       ) -> Response:
    """The prompt encoder + mask decoder as ONNX, exported once per base model (the first
    request waits for the export, seconds)."""
    decoder = await run_in_threadpool(runtime.decoder.get)
    headers = {"ETag": decoder.etag, "Cache-Control": CACHE_CONTROL}
    if if_none_match is not None and decoder.etag in (t.strip() for t in if_none_match.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(decoder.data, media_type=ONNX_MEDIA_TYPE, headers=headers)
