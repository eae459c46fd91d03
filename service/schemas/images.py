"""Schemas of ``/v1/images``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ImageUploadRequest(BaseModel):
    """The JSON form of an image upload (the other form is multipart with a ``file`` part)."""

    model_config = ConfigDict(extra="forbid")

    image_base64: str = Field(description="The encoded image file (PNG, JPEG, BMP, TIFF or "
                              "WebP), standard base64.")


class ImageUploadResponse(BaseModel):
    """A stored image: its id (a content hash, so uploading the same pixels again gives the
    same id) and size in pixels."""

    image_id: str
    width: int
    height: int
