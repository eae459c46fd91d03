"""``GET /v1/images/{image_id}/embedding``: an image's embedding under one adapter version, as
``.npy``, for clients that decode masks themselves with ``GET /v1/models/decoder.onnx``.

The embedding is the one ``POST /v1/segment`` uses (the same cache, computed on a miss). The
response names the adapter version that made it, the original image size and the size after
``ResizeLongestSide`` (what the decoder's point coordinates are relative to), and carries an
ETag of the image and that version's weights: a client revalidates with ``If-None-Match``
and gets 304 (no body) while the version it holds is still current, or the new embedding
after a hot swap.
"""

from __future__ import annotations

import io
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Header, Path, Query, Response

from infra.names import MAX_NAME_LENGTH, name_schema
from service.api.deps import RuntimeDep, require_segment_access
from service.api.problems import problem_responses
from service.api.routers.segment import VERSION_HEADER
from service.api.schemas.segment import IMAGE_ID_PATTERN

router = APIRouter(prefix="/v1/images", tags=["images"],
                   dependencies=[Depends(require_segment_access)])

ORIGINAL_SIZE_HEADER = "X-Regcl-Original-Size"
INPUT_SIZE_HEADER = "X-Regcl-Input-Size"
NPY_MEDIA_TYPE = "application/x-npy"
CACHE_CONTROL = "private, no-cache"  # keep it, but ask each time: live may have changed

_SIZE_SCHEMA = {"type": "string", "pattern": r"^[0-9]+,[0-9]+$"}
_HEADERS: dict[str, Any] = {
    "ETag": {"description": "The image and the adapter version's weights (quoted).",
             "schema": {"type": "string"}, "required": True},
    VERSION_HEADER: {"description": "'base', 'live:<n>' or 'domain:<name>'.",
                     "schema": {"type": "string"}, "required": True},
    "Cache-Control": {"schema": {"type": "string", "enum": [CACHE_CONTROL]}, "required": True},
}
_SIZES: dict[str, Any] = {
    ORIGINAL_SIZE_HEADER: {"description": "H,W of the image as uploaded.",
                           "schema": _SIZE_SCHEMA, "required": True},
    INPUT_SIZE_HEADER: {"description": "H,W after resizing the long side to the model's "
                        "input size (before padding).", "schema": _SIZE_SCHEMA,
                        "required": True},
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The embedding: a NumPy .npy file of float32, shape 1 x C x h x w "
                         "(C, h, w of the served model).",
          "content": {NPY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
          "headers": {**_HEADERS, **_SIZES}},
    304: {"description": "The embedding named by If-None-Match is still current.",
          "headers": _HEADERS},
    **problem_responses(401, 404, 422, 503),
}

ImageIdPath = Annotated[str, Path(description="Id returned by POST /v1/images.",
                                  json_schema_extra={"pattern": IMAGE_ID_PATTERN})]
AdapterQuery = Annotated[str, Query(max_length=MAX_NAME_LENGTH, description="'live' (default), "
                                    "'base', or an uploaded adapter's name.",
                                    json_schema_extra=name_schema())]


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as a ``.npy`` file (format version 1.0)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@router.get("/{image_id}/embedding", response_class=Response, response_model=None,
            responses=_RESPONSES)
def image_embedding(image_id: ImageIdPath, runtime: RuntimeDep, adapter: AdapterQuery = "live",
                    if_none_match: Annotated[str | None, Header(
                        description="An ETag this endpoint gave: 304 if still current.")]
                    = None) -> Response:
    """The image's embedding under ``adapter`` (from the cache, else encoded now), with the
    version that made it; decode it with ``GET /v1/models/decoder.onnx``."""
    encoded, version = runtime.engine.encode(image_id, adapter)
    etag = runtime.engine.embedding_etag(encoded)
    headers = {"ETag": etag, VERSION_HEADER: version, "Cache-Control": CACHE_CONTROL}
    if if_none_match is not None and etag in (t.strip() for t in if_none_match.split(",")):
        return Response(status_code=304, headers=headers)
    features = encoded.features.detach().float().cpu().numpy()
    headers[ORIGINAL_SIZE_HEADER] = "{},{}".format(*encoded.original_size)
    headers[INPUT_SIZE_HEADER] = "{},{}".format(*encoded.input_size)
    return Response(npy_bytes(features), media_type=NPY_MEDIA_TYPE, headers=headers)
