"""Schemas of ``/v1/images``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas.documented import IMAGE_FORMAT


class ImageUploadRequest(BaseModel):
    """The JSON form of an image upload (the other form is multipart with a ``file`` part)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image_base64: str = Field(description="The encoded image file (PNG, JPEG, BMP, TIFF or "
                              "WebP), standard base64.",
                              json_schema_extra={"format": IMAGE_FORMAT})


class ImageUploadResponse(BaseModel):
    """A stored image: its id (a content hash, so uploading the same pixels again gives the
    same id) and size in pixels."""

    image_id: str
    width: int
    height: int
