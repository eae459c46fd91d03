"""Schemas of ``/v1/segment``.

Coordinates are pixels of the uploaded image: x to the right in [0, W], y down in [0, H].
Prompt arrays are passed to the engine as sent, so a malformed prompt is answered with the
engine's own problem type (``prompt-shape``, ``invalid-label``, ``non-finite-value``, ...);
the document states each of those checks (:func:`_prompt_schema`), except the image's bounds,
which depend on the image (its width and height come back from ``POST /v1/images``).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from infra.names import name_schema
from service.api.schemas.documented import IMAGE_FORMAT, MASK_FORMAT
from service.api.schemas.routing import RouteInfo
from service.engine.prompt_checks import DEFAULT_MAX_POINTS

MaskFormat = Literal["rle", "png"]


MAX_BATCH_PROMPTS = 64
IMAGE_ID_PATTERN = "^[0-9a-f]{64}$"


def _nullable(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}], "description": description}


def _prompt_schema(schema: dict[str, Any]) -> None:
    """What the engine checks of a prompt
    (``service.engine.prompt_checks.check_prompt``), as JSON Schema:
    points N x 2 with N ≤ the engine's limit and labels in {0, 1}, one per point; a box of 4
    numbers; coordinates ≥ 0; and at least one of points, box, mask_input."""
    coordinate = {"type": "number", "minimum": 0}
    props = schema["properties"]
    props["points"] = _nullable(
        {"type": "array", "maxItems": DEFAULT_MAX_POINTS,
         "items": {"type": "array", "items": coordinate, "minItems": 2, "maxItems": 2}},
        "N x 2 point prompts [[x, y], ...], 0 ≤ x ≤ W, 0 ≤ y ≤ H.")
    props["labels"] = _nullable(
        {"type": "array", "maxItems": DEFAULT_MAX_POINTS, "items": {"enum": [0, 1]}},
        "N labels, one per point: 1 foreground, 0 background.")
    props["box"] = _nullable(
        {"type": "array", "items": coordinate, "minItems": 4, "maxItems": 4},
        "Box prompt: two opposite corners [x0, y0, x1, y1] (in either order), within the "
        "image.")
    props["mask_input"] = _nullable({"type": "string", "format": MASK_FORMAT},
                                    props["mask_input"].get("description", ""))
    one_per_point = [{"properties": {"points": {"type": "null"}, "labels": {"type": "null"}}}]
    one_per_point += [{"required": ["points", "labels"], "properties": {
        "points": {"type": "array", "minItems": n, "maxItems": n},
        "labels": {"type": "array", "minItems": n, "maxItems": n}}}
        for n in range(DEFAULT_MAX_POINTS + 1)]
    something = [{"required": ["points"], "properties": {"points": {"type": "array",
                                                                    "minItems": 1}}},
                 {"required": ["box"], "properties": {"box": {"type": "array"}}},
                 {"required": ["mask_input"], "properties": {"mask_input": {"type": "string"}}}]
    schema.setdefault("allOf", []).extend([{"anyOf": something}, {"anyOf": one_per_point}])


def _options_schema(schema: dict[str, Any]) -> None:
    """The image: exactly one of ``image_id`` (as ``POST /v1/images`` returns it) and
    ``image_base64``; the adapter: ``live``, ``base`` or an adapter's name."""
    props = schema["properties"]
    props["image_id"] = _nullable({"type": "string", "pattern": IMAGE_ID_PATTERN},
                                  "Id returned by POST /v1/images.")
    props["image_base64"] = _nullable(
        {"type": "string", "format": IMAGE_FORMAT},
        "The image file inline (PNG, JPEG, BMP, TIFF or WebP), standard base64; it is "
        "stored, and its id returned.")
    props["adapter"].update(name_schema())
    schema.setdefault("allOf", []).append({"oneOf": [
        {"required": ["image_id"], "properties": {"image_id": {"type": "string"},
                                                  "image_base64": {"type": "null"}}},
        {"required": ["image_base64"], "properties": {"image_base64": {"type": "string"},
                                                      "image_id": {"type": "null"}}}]})


def _request_schema(schema: dict[str, Any]) -> None:
    _options_schema(schema)
    _prompt_schema(schema)


_STRICT = ConfigDict(extra="forbid", strict=True)


class PromptFields(BaseModel):
    """One prompt: at least one of points (+ labels), box, mask_input."""

    model_config = ConfigDict(**_STRICT, json_schema_extra=_prompt_schema)

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

    @field_validator("box")
    @classmethod
    def _corners_in_either_order(cls, box: list[float] | None) -> list[float] | None:
        """A box is the rectangle between two opposite corners, given in either order (the
        document cannot state x0 ≤ x1, so the API does not ask for it); other boxes go to the
        engine's checks as sent."""
        if box is None or len(box) != 4 or not all(math.isfinite(v) for v in box):
            return box
        x0, y0, x1, y1 = box
        return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]


class SegmentOptions(BaseModel):
    """The image (``image_id`` from ``POST /v1/images``, or ``image_base64`` inline) and how
    to answer."""

    model_config = ConfigDict(**_STRICT, json_schema_extra=_options_schema)

    image_id: str | None = Field(default=None, max_length=128,
                                 description="Id returned by POST /v1/images.")
    image_base64: str | None = Field(default=None, description="The image file inline, "
                                     "base64 (it is stored, and its id returned).")
    multimask: bool = Field(default=True, description="Three masks for an ambiguous prompt "
                            "(else one).")
    adapter: str = Field(default="live", max_length=64,
                         description="'live' (the merged adapter; the base model until one is "
                         "activated), 'base', an uploaded adapter's name, or 'auto' (the "
                         "domain router picks the uploaded adapter of the image's domain from "
                         "the adapters' statistics, else 'live' serves; see `route`).")
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

    model_config = ConfigDict(**_STRICT, json_schema_extra=_request_schema)


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
    route: RouteInfo | None = Field(default=None, description="adapter 'auto' only: what the "
                                    "domain router chose (also the X-Regcl-Route header).")


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
    route: RouteInfo | None = Field(default=None, description="adapter 'auto' only: what the "
                                    "domain router chose (also the X-Regcl-Route header).")
