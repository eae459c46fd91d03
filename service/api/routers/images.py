"""``POST /v1/images``: store an image for segmentation (its embedding is computed lazily)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from regcl.data.images import decode_image_bytes
from regcl.errors import DataError
from service.api.deps import RuntimeDep, require_segment_access
from service.api.errors import UnsupportedMediaTypeError
from service.api.problems import problem_responses
from service.api.runtime import Runtime
from service.api.schemas.images import ImageUploadRequest, ImageUploadResponse
from service.api.uploads import decode_base64, read_bounded
from service.engine.errors import InvalidImageError, ServiceError

router = APIRouter(prefix="/v1/images", tags=["images"],
                   dependencies=[Depends(require_segment_access)])

_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"], "additionalProperties": False,
                           "properties": {"file": {
                               "type": "string", "format": "binary",
                               "description": "An image file: PNG, JPEG, BMP, TIFF or WebP."}}},
                "encoding": {"file": {"contentType": "image/*"}}},
            "application/json": {"schema": ImageUploadRequest.model_json_schema()},
        },
    }
}


def store_image(runtime: Runtime, data: bytes) -> ImageUploadResponse:
    """Decode an uploaded image file and store it in the engine (blocking)."""
    try:
        image = decode_image_bytes(data, runtime.settings.max_image_pixels)
    except DataError as exc:
        raise InvalidImageError(str(exc)) from exc
    image_id = runtime.engine.images.register(image)
    return ImageUploadResponse(image_id=image_id, width=int(image.shape[1]),
                               height=int(image.shape[0]))


@router.post("", response_model=ImageUploadResponse, status_code=201,
             openapi_extra=_UPLOAD_BODY,
             responses=problem_responses(400, 401, 413, 415, 422))
async def upload_image(request: Request, runtime: RuntimeDep) -> ImageUploadResponse:
    """Upload an image as multipart (``file``) or JSON (``{"image_base64": ...}``); returns
    its id and size. Segment it with ``POST /v1/segment``."""
    limit = runtime.settings.max_upload_bytes
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async with request.form(max_files=1, max_fields=0) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ServiceError("the multipart form needs a 'file' part")
            data = await run_in_threadpool(read_bounded, upload.file, limit, "the image")
    elif content_type == "application/json" or content_type.endswith("+json"):
        try:
            body = ImageUploadRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise _as_validation_error(exc) from None
        data = decode_base64(body.image_base64, limit, "image_base64")
    else:
        raise UnsupportedMediaTypeError("send multipart/form-data with a 'file' "
                                        "part, or application/json with 'image_base64'")
    return await run_in_threadpool(store_image, runtime, data)


def _as_validation_error(exc: ValidationError) -> RequestValidationError:
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])

