"""The OpenAPI document, corrected in one place to state what the server does.

FastAPI builds the document from the routes; what their models cannot say is set here, once
the app's routes and settings are known:

- every error answer is ``application/problem+json`` with the :class:`Problem` schema
  (FastAPI documents its own 422 as ``application/json``);
- image upload and segmentation are marked as needing a key only where this deployment
  requires one (``REGCL_SEGMENT_REQUIRES_KEY``; otherwise they answer without one);
- a multipart form's optional parts are simply not required (a part cannot be null), and it
  takes no other parts;
- base64 strings as the server decodes them (standard alphabet, padding required), with the
  limits that come from the settings and the served model: the length of a base64 image
  (``REGCL_MAX_UPLOAD_BYTES``) and of a ``mask_input`` (4 x the embedding size, squared, as
  float32).

What no schema can state - that base64 bytes are an image, that an archive holds a dataset,
that safetensors weights fit the model, that a string holds XML or a JSON object - is answered
422 with a problem type of its own (``invalid-image``, ``invalid-archive``, ``invalid-adapter``,
``invalid-label-config``, ``invalid-json-field``, ...), documented on each operation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from infra.settings import Settings
from regcl.models.build import SAM_SPECS
from service.api.auth import key_check
from service.api.deps import check_segment_access, presented_key
from service.api.problems import PROBLEM_MEDIA_TYPE, Problem
from service.api.routes import api_routes
from service.api.schemas.documented import IMAGE_FORMAT, MASK_FORMAT

__all__ = ["install_openapi"]

_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_B64 = "[A-Za-z0-9+/]"
BASE64_PATTERN = rf"^(?:{_B64}{{4}})*(?:{_B64}{{2}}==|{_B64}{{3}}=)?$"
"""Standard base64 with its padding, what ``service.api.uploads.decode_base64`` accepts."""


def base64_pattern_of(size: int) -> str:
    """The base64 of exactly ``size`` bytes, as a pattern that states its length (so that a
    generator needs no filter to meet it)."""
    tail = {0: "", 1: f"{_B64}{{2}}==", 2: f"{_B64}{{3}}="}[size % 3]
    return f"^{_B64}{{{4 * (size // 3)}}}{tail}$"
_FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve the corrected document at ``/openapi.json`` (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version,
                                   description=app.description, routes=app.routes)
            _problems(document)
            _segmentation_security(document, app, settings)
            _multipart_forms(document)
            _settings_limits(document, settings)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _operations(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for item in document.get("paths", {}).values():
        for operation in item.values():
            if isinstance(operation, dict) and "responses" in operation:
                yield operation


def _problems(document: dict[str, Any]) -> None:
    """Every problem answer as ``application/problem+json`` with the Problem schema."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema()
    for operation in _operations(document):
        for status, response in operation["responses"].items():
            content = response.get("content", {})
            fastapi_422 = any(str(c.get("schema", {}).get("$ref", "")).endswith(
                "/HTTPValidationError") for c in content.values())
            if status.isdigit() and int(status) >= 400 and (PROBLEM_MEDIA_TYPE in content
                                                           or fastapi_422):
                response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": dict(_PROBLEM_REF)}}
                if fastapi_422:
                    response["description"] = "Problem details (RFC 7807)"
    for name in _FASTAPI_VALIDATION:
        schemas.pop(name, None)


def _segmentation_security(document: dict[str, Any], app: FastAPI, settings: Settings
                           ) -> None:
    """Open segmentation (the default) takes no key: no security, no 401 (except on a route
    that reads the key itself, for a part that needs the admin key: Label Studio's setup with
    extra params)."""
    if settings.segment_requires_key:
        return
    for path, route in api_routes(app):
        if key_check(route.dependant) is not check_segment_access:
            continue
        key_optional = any(dep.call is presented_key for dep in route.dependant.dependencies)
        for method in route.methods or ():
            operation = document["paths"].get(path, {}).get(method.lower())
            if operation is None:
                continue
            if key_optional:  # {}: the key may also be left out
                operation["security"] = [{}, *operation.get("security", [])]
            else:
                operation.pop("security", None)
                operation["responses"].pop("401", None)


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
        return document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return schema


def _multipart_forms(document: dict[str, Any]) -> None:
    """Optional parts are not required rather than nullable; no parts beyond the form's."""
    for operation in _operations(document):
        content = operation.get("requestBody", {}).get("content", {})
        form = content.get("multipart/form-data")
        if form is None or "schema" not in form:
            continue
        schema = _resolve(document, form["schema"])
        schema["additionalProperties"] = False
        for name, prop in list(schema.get("properties", {}).items()):
            options = prop.get("anyOf")
            if isinstance(options, list) and {"type": "null"} in options:
                (kept,) = [o for o in options if o != {"type": "null"}]
                rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
                schema["properties"][name] = {**kept, **rest}
            if schema["properties"][name].get("contentMediaType") == "application/octet-stream":
                schema["properties"][name].pop("contentMediaType")
                schema["properties"][name]["format"] = "binary"


def _strings_of_format(node: Any, fmt: str) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if node.get("format") == fmt:
            yield node
        for value in node.values():
            yield from _strings_of_format(value, fmt)
    elif isinstance(node, list):
        for item in node:
            yield from _strings_of_format(item, fmt)


def _settings_limits(document: dict[str, Any], settings: Settings) -> None:
    """Lengths that depend on the deployment: base64 images up to ``max_upload_bytes``, mask
    inputs of exactly the served model's size."""
    image_chars = 4 * math.ceil(settings.max_upload_bytes / 3)
    for schema in _strings_of_format(document, IMAGE_FORMAT):
        schema.update(minLength=4, maxLength=image_chars, pattern=BASE64_PATTERN)
    side = SAM_SPECS[settings.model].mask_input_side
    mask_chars = 4 * math.ceil(4 * side * side / 3)
    for schema in _strings_of_format(document, MASK_FORMAT):
        schema.update(minLength=mask_chars, maxLength=mask_chars,
                      pattern=base64_pattern_of(4 * side * side))
        schema["description"] = (f"{schema.get('description', '')} For this service: "
                                 f"{side} x {side} values.").strip()
