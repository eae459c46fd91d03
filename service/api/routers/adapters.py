"""``/v1/adapters``: upload, list, describe, download and delete domain adapters.

An upload is checked completely before anything is stored: PEFT LoRA format, safetensors only
(pickle-based files are refused by name and never read), finite weights, statistics that fit
the weights, and targets and shapes that fit the serving model (checked on a weightless copy
of its architecture, see :func:`service.engine.live_swap.check_adapter_fits`).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import StreamingResponse

from infra.base_model import base_metadata, check_base_model, check_base_model_name
from infra.errors import Conflict
from infra.names import name_schema, validate_name
from regcl.adapters import AdapterFiles, read_adapter
from regcl.adapters.layout import (
    CONFIG_FILE,
    META_FILE,
    STATS_FILE,
    UNSAFE_SUFFIXES,
    WEIGHTS_FILE,
)
from regcl.errors import AdapterError, RegclError
from service.api.deps import AdminKey, EngineDep, RegistryDep, RuntimeDep
from service.api.errors import UnsafeFileError
from service.api.problems import problem_responses
from service.api.runtime import Runtime
from service.api.schemas.adapters import (
    AdapterDeleteResponse,
    AdapterInfo,
    AdapterListResponse,
    AdapterUploadResponse,
)
from service.api.schemas.documented import (
    JSON_OBJECT_FIELD,
    NamePath,
    upload_parts,
)
from service.api.uploads import copy_bounded, form_json_object, name_taken
from service.engine.live_swap import check_adapter_fits

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

_ZIP_CHUNK = 1 << 16


def _check_file_name(upload: UploadFile | None, field: str, suffix: str) -> None:
    """Refuse pickle-based and otherwise unexpected files by their name, before reading."""
    if upload is None:
        return
    name = (upload.filename or "").lower()
    if name.endswith(UNSAFE_SUFFIXES):
        raise UnsafeFileError(f"{field}: pickle-based files ({upload.filename!r}) "
                              "are refused; save the adapter with safetensors")
    if name and not name.endswith(suffix):
        raise UnsafeFileError(f"{field}: expected a {suffix} file, got "
                              f"{upload.filename!r}")


def _stage(runtime: Runtime, directory: Path, uploads: dict[str, UploadFile | None],
           metadata: dict[str, Any]) -> None:
    """Write the uploads under their canonical names (client file names never become paths)."""
    limit = runtime.settings.max_upload_bytes
    for target, upload in uploads.items():
        if upload is not None:
            copy_bounded(upload.file, directory / target, limit, target)
    (directory / META_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))


def _read_upload(directory: Path) -> AdapterFiles:
    """``read_adapter``, with any failure on these untrusted bytes reported as a bad adapter
    (the library's checks raise typed errors; a malformed tensor can still surprise them)."""
    try:
        return read_adapter(directory)
    except RegclError:
        raise
    except Exception as exc:
        raise AdapterError(f"unreadable adapter: {type(exc).__name__}: {exc}") from exc


@router.post("", response_model=AdapterUploadResponse, status_code=201,
             responses=problem_responses(400, 401, 403, 409, 413, 422, 503, 507),
             openapi_extra=upload_parts(
                 adapter_config=("application/json", CONFIG_FILE),
                 adapter_model=("application/octet-stream", WEIGHTS_FILE),
                 regcl_stats=("application/octet-stream", STATS_FILE)))
def upload_adapter(
    _: AdminKey,
    runtime: RuntimeDep,
    name: Annotated[str, Form(description="Registry name (lower-case letters, digits, _ and -; "
                              "at most 64 characters), other than base, live and auto.",
                              json_schema_extra=name_schema(new=True))],
    adapter_config: Annotated[UploadFile, File(
        description="PEFT adapter_config.json of a LoRA on the served model's image encoder.")],
    adapter_model: Annotated[UploadFile, File(
        description="adapter_model.safetensors: finite LoRA weights whose names and shapes fit "
        "the served model (never a pickle: .bin, .pt, ... are refused by name).")],
    domain: Annotated[str | None, Form(description="Image domain (default: the name).",
                                       json_schema_extra=name_schema())] = None,
    regcl_stats: Annotated[UploadFile | None, File(
        description="regcl_stats.safetensors: a finite Gram (in x in) and a token count per "
        "LoRA weight (needed to merge).")] = None,
    metadata: Annotated[str | None, Form(
        description="A JSON object stored with it; base_model and base_fingerprint, if given, "
        "must name the served model.", json_schema_extra=JSON_OBJECT_FIELD)] = None,
) -> AdapterUploadResponse:
    """Upload a PEFT LoRA adapter for the serving model. Without ``regcl_stats`` it can be
    served (``adapter=<name>`` in /v1/segment) but not merged (``has_stats: false``)."""
    validate_name(name, "adapter name", new=True)
    domain = validate_name(domain, "domain") if domain is not None else name
    _check_file_name(adapter_config, "adapter_config", ".json")
    _check_file_name(adapter_model, "adapter_model", ".safetensors")
    _check_file_name(regcl_stats, "regcl_stats", ".safetensors")
    user = form_json_object(metadata, "metadata")
    if name_taken(lambda: runtime.registry.get_adapter(name)):
        raise Conflict(f"adapter {name!r} already exists")
    engine = runtime.engine
    stored = {**user, "domain": domain,
              **base_metadata(runtime.settings.model, engine.adapters.base_fingerprint),
              "uploaded_at": datetime.now(UTC).isoformat()}
    if "base_fingerprint" in user:  # a claim to check; without one, the upload is stamped
        check_base_model(user, runtime.settings.model, engine.adapters.base_fingerprint,
                         "the adapter's metadata")
    check_base_model_name(user.get("base_model"), runtime.settings.model, "metadata.base_model")
    with runtime.scratch_dir("adapter-") as scratch:
        directory = scratch / name
        directory.mkdir()
        _stage(runtime, directory, {CONFIG_FILE: adapter_config, WEIGHTS_FILE: adapter_model,
                                    STATS_FILE: regcl_stats}, stored)
        files = _read_upload(directory)
        check_base_model_name(getattr(files.config, "base_model_name_or_path", None),
                              runtime.settings.model, "adapter_config.base_model_name_or_path")
        check_adapter_fits(runtime.settings.model, files, f"adapter {name!r}")
        record = runtime.registry.add_adapter(name, directory, stored)
    return AdapterUploadResponse(adapter=AdapterInfo.of(record))


@router.get("", response_model=AdapterListResponse, responses=problem_responses(503))
def list_adapters(registry: RegistryDep) -> AdapterListResponse:
    """Every adapter, by name."""
    return AdapterListResponse(adapters=[AdapterInfo.of(r) for r in registry.list_adapters()])


@router.get("/{name}", response_model=AdapterInfo, responses=problem_responses(404, 422))
def get_adapter(name: NamePath, registry: RegistryDep) -> AdapterInfo:
    """One adapter's record."""
    return AdapterInfo.of(registry.get_adapter(name))


def _zip_chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), _ZIP_CHUNK):
        yield data[start:start + _ZIP_CHUNK]


@router.get("/{name}/download", response_class=StreamingResponse, response_model=None,
            responses={200: {"content": {"application/zip": {}},
                             "description": "The adapter directory as a zip file."},
                       **problem_responses(404, 422, 503)})
def download_adapter(name: NamePath, runtime: RuntimeDep) -> StreamingResponse:
    """The adapter directory (PEFT files, statistics, metadata) as a zip file."""
    record = runtime.registry.get_adapter(name)
    path = runtime.registry.fetch_adapter(name, runtime.cache_dir)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel in record.files:
            zf.write(path / rel, f"{name}/{rel}")
    return StreamingResponse(
        _zip_chunks(buffer.getvalue()), media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{name}.zip"',
                 "ETag": f'"{record.sha256}"'})


@router.delete("/{name}", response_model=AdapterDeleteResponse,
               responses=problem_responses(401, 403, 404, 409, 422, 503))
def delete_adapter(_: AdminKey, name: NamePath, registry: RegistryDep,
                   engine: EngineDep) -> AdapterDeleteResponse:
    """Delete an adapter (versions merged from it keep their own copies)."""
    registry.delete_adapter(name)
    engine.adapters.unload_domain(name, missing_ok=True)
    return AdapterDeleteResponse(name=name, deleted=True)
