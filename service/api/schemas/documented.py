"""Request fields documented with more than their pydantic type says: the job parameters are
validated by the workers' own models when a job is submitted (``invalid-argument``), and the
document states those models, bounds and all, inline; prompts and images are checked by the
engine with their own problem types, and the document states those checks. The string formats
of base64 content are named here (their lengths are set per deployment by
:mod:`service.api.openapi`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path
from pydantic import Field, TypeAdapter, WithJsonSchema

from infra.jobs import JOB_ID_PATTERN
from infra.names import MAX_NAME_LENGTH, name_schema

__all__ = ["IMAGE_FORMAT", "JSON_OBJECT_FIELD", "MASK_FORMAT", "JobIdPath",
           "NamePath", "VersionPath", "documented_as", "inline_schema", "upload_parts"]

IMAGE_FORMAT = "base64-image"
"""``format`` of a string holding an image file (PNG, JPEG, BMP, TIFF, WebP) in base64."""
MASK_FORMAT = "base64-float32"
"""``format`` of a string holding little-endian float32 values in base64."""
JSON_OBJECT_FIELD: dict[str, Any] = {"contentMediaType": "application/json",
                                     "contentSchema": {"type": "object"}}
"""A form field holding a JSON object (anything else is 422 ``invalid-json-field``)."""


Name = Annotated[str, Field(max_length=MAX_NAME_LENGTH, json_schema_extra=name_schema())]
"""An adapter or dataset name (:mod:`infra.names`; one that breaks the rule: 422
``invalid-name``)."""
NewName = Annotated[str, Field(max_length=MAX_NAME_LENGTH,
                               json_schema_extra=name_schema(new=True))]
"""A name for something new: the rule, and not ``base``, ``live`` or ``auto``."""
NamePath = Annotated[str, Path(description="An adapter or dataset name.",
                               json_schema_extra=name_schema())]
JobIdPath = Annotated[str, Path(description="A job id.",
                                json_schema_extra={"pattern": f"^{JOB_ID_PATTERN}$"})]
VersionPath = Annotated[int, Path(description="A version number.",
                                  json_schema_extra={"minimum": 1})]
"""Path parameters, documented with the rule the stores check (a name or id that breaks it is
answered like an unknown one: 404, or 422 ``invalid-name``)."""


def upload_parts(**parts: tuple[str, str]) -> dict[str, Any]:
    """``openapi_extra`` of a multipart upload route: each file part's media type and the
    file name it may carry (``name=(media type, file name)``; the routes refuse other
    suffixes)."""
    encoding = {}
    for name, (media_type, filename) in parts.items():
        suffix = filename[filename.rfind("."):]
        encoding[name] = {"contentType": media_type, "headers": {"Content-Disposition": {
            "description": f"The part's file name, if it has one, ends in {suffix}.",
            "schema": {"type": "string",
                       "example": f'form-data; name="{name}"; filename="{filename}"'}}}}
    return {"requestBody": {"content": {"multipart/form-data": {"encoding": encoding}}}}
def inline_schema(tp: Any) -> dict[str, Any]:
    """The JSON Schema of ``tp`` (validation mode) with each local ``$ref`` replaced by its
    definition, so that it can stand inside another document."""
    schema = TypeAdapter(tp).json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return resolve({**definitions[ref.removeprefix("#/$defs/")], **rest})
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


def documented_as(tp: Any, *, nullable: bool = False, **extra: Any) -> WithJsonSchema:
    """Document a field as ``tp`` (or null, when ``nullable``), with ``extra`` keywords."""
    schema = inline_schema(tp)
    if nullable:
        schema = {"anyOf": [schema, {"type": "null"}]}
    return WithJsonSchema({**schema, **extra})
