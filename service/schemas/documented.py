"""Request fields whose document is another model's schema: the job parameters are validated
by the workers' own models when a job is submitted (``invalid-argument``), and the OpenAPI
document states those models, bounds and all, inline."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, WithJsonSchema

__all__ = ["documented_as", "inline_schema"]


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
