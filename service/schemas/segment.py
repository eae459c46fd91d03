"""Schemas of ``/v1/segment``.

Coordinates are pixels of the uploaded image: x to the right in [0, W], y down in [0, H].
Prompt arrays are passed to the engine as sent, so a malformed prompt is answered with the
engine's own problem type (``prompt-shape``, ``invalid-label``, ``non-finite-value``, ...).
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

MaskFormat = Literal["rle", "png"]


MAX_BATCH_PROMPTS = 64


class PromptFields(BaseModel):
    """One prompt: at least one of points (+ labels), box, mask_input."""

    model_config = ConfigDict(extra="forbid")

    points: list[list[float]] | None = Field(
        default=None, max_length=1024, description="N x 2 point prompts [[x, y], ...].")
    labels: list[float] | None = Field(
        default=None, max_length=1024, description="N labels: 1 foreground, 0 background.")
    box: list[float] | None = Field(default=None, max_length=16,
                                    description="Box prompt [x0, y0, x1, y1].")
    mask_input: str | None = Field(
        default=None, description="Low-res logits of an earlier result (its "
        "`low_res_logits`): base64 of little-endian float32, side x side values, where side "
        "is 4 x the image-embedding size (256 for SAM, 64 for tiny).")


class SegmentOptions(BaseModel):
    """The image (``image_id`` from ``POST /v1/images``, or ``image_base64`` inline) and how
    to answer."""

    model_config = ConfigDict(extra="forbid")

    image_id: str | None = Field(default=None, max_length=128,
                                 description="Id returned by POST /v1/images.")
    image_base64: str | None = Field(default=None, description="The image file inline, "
                                     "base64 (it is stored, and its id returned).")
    multimask: bool = Field(default=True, description="Three masks for an ambiguous prompt "
                            "(else one).")
    adapter: str = Field(default="live", max_length=64,
                         description="'live' (the merged adapter; the base model until one is "
                         "activated), 'base', or an uploaded adapter's name.")
    format: MaskFormat = Field(default="rle", description="'rle' (COCO compressed RLE) or "
                               "'png' (base64 8-bit PNG, 255 on the object).")
    return_logits: bool = Field(default=False, description="Also return each mask's low-res "
                                "logits (base64 float32) to send back as mask_input.")

    @model_validator(mode="after")
    def _one_image(self) -> Self:
        if (self.image_id is None) == (self.image_base64 is None):
            raise ValueError("give exactly one of image_id and image_base64")
        return self


class SegmentRequest(SegmentOptions, PromptFields):
    """One prompt on one image: give ``image_id`` (from ``POST /v1/images``) or the image
    inline as ``image_base64``; and at least one of points (+ labels), box, mask_input."""


class SegmentBatchRequest(SegmentOptions):
    """Several prompts on one image (one encode; prompts of the same form share one
    mask-decoder call). Options apply to every prompt."""

    prompts: list[PromptFields] = Field(min_length=1, max_length=MAX_BATCH_PROMPTS,
                                        description="The prompts, each as in POST /v1/segment.")


class RLE(BaseModel):
    """COCO compressed RLE, as ``pycocotools.mask.encode`` makes it (counts as text)."""

    size: tuple[int, int] = Field(description="[height, width]")
    counts: str


class MaskResult(BaseModel):
    """One mask: ``rle`` or ``png`` by the requested format; ``score`` is SAM's predicted IoU;
    ``area`` in pixels; ``bbox`` the tight box as COCO [x, y, w, h]."""

    rle: RLE | None = None
    png: str | None = None
    score: float
    area: int
    bbox: tuple[int, int, int, int]
    low_res_logits: str | None = None


class SegmentResponse(BaseModel):
    """Masks for the prompt, in SAM's order (not sorted by score). The adapter version that
    produced them is also in the ``X-Regcl-Adapter-Version`` header."""

    masks: list[MaskResult]
    adapter_version: str = Field(description="'base', 'live:<n>' or 'domain:<name>'.")
    image_id: str
    cache_hit: bool = Field(description="Whether the image embedding came from the cache.")


class PromptMasks(BaseModel):
    """The masks of one prompt, in SAM's order."""

    masks: list[MaskResult]


class SegmentBatchResponse(BaseModel):
    """One entry per prompt, in the request's order; one adapter version for all of them
    (also in the ``X-Regcl-Adapter-Version`` header)."""

    results: list[PromptMasks]
    adapter_version: str = Field(description="'base', 'live:<n>' or 'domain:<name>'.")
    image_id: str
    cache_hit: bool = Field(description="Whether the image embedding came from the cache.")
