"""``/v1/datasets``: upload (a zip), list, describe and delete domain datasets.

The archive is unpacked by :func:`service.api.uploads.extract_zip` (zip-slip paths, links, other
file types and zip bombs refused), its layout detected (``images/`` + ``masks/`` folder pairs,
or COCO ``annotations.json`` + ``images/``; one enclosing folder is allowed), and opened with
the library's loaders before it is stored, so a stored dataset always loads.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from infra.datasets import dataset_format, open_dataset, validate_dataset_name, verify_samples
from infra.errors import Conflict
from infra.names import name_schema
from service.api.deps import AdminKey, DatasetsDep, RuntimeDep
from service.api.errors import InvalidArchiveError
from service.api.problems import problem_responses
from service.api.schemas.datasets import (
    DatasetDeleteResponse,
    DatasetInfo,
    DatasetListResponse,
    DatasetUploadResponse,
)
from service.api.schemas.documented import JSON_OBJECT_FIELD, NamePath, upload_parts
from service.api.uploads import (
    copy_bounded,
    extract_zip,
    form_json_object,
    name_taken,
    single_root,
)

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

MAX_ARCHIVE_FILES = 100_000
UNPACKED_FACTOR = 4
"""An archive may unpack to this many times ``max_upload_bytes`` (images hardly compress, so
real datasets stay near 1)."""


@router.post("", response_model=DatasetUploadResponse, status_code=201,
             responses=problem_responses(400, 401, 403, 409, 413, 422, 503, 507),
             openapi_extra=upload_parts(file=("application/zip", "dataset.zip")))
def upload_dataset(
    _: AdminKey,
    runtime: RuntimeDep,
    name: Annotated[str, Form(description="Dataset name (lower-case letters, digits, _ and -; "
                              "at most 64 characters).", json_schema_extra=name_schema())],
    file: Annotated[UploadFile, File(description="A zip of images/ + masks/ (pairs by name), "
                                     "or of annotations.json (COCO) + images/; every sample "
                                     "must read.")],
    metadata: Annotated[str | None, Form(description="A JSON object stored with it.",
                                         json_schema_extra=JSON_OBJECT_FIELD)] = None,
) -> DatasetUploadResponse:
    """Upload a dataset of one image domain for training and evaluation jobs."""
    validate_dataset_name(name)
    user = form_json_object(metadata, "metadata")
    if file.filename and not file.filename.lower().endswith(".zip"):
        raise InvalidArchiveError(f"expected a .zip file, got {file.filename!r}")
    if name_taken(lambda: runtime.datasets.get_dataset(name)):
        raise Conflict(f"dataset {name!r} already exists")
    settings = runtime.settings
    with runtime.scratch_dir("dataset-") as scratch:
        archive = scratch / "upload.zip"
        copy_bounded(file.file, archive, settings.max_upload_bytes, "the dataset archive")
        unpacked = scratch / "unpacked"
        unpacked.mkdir()
        extract_zip(archive, unpacked, max_files=MAX_ARCHIVE_FILES,
                    max_bytes=UNPACKED_FACTOR * settings.max_upload_bytes)
        archive.unlink()
        root = single_root(unpacked)
        dataset_format(root)
        # DataError if malformed: layout, references, then every sample read once
        verify_samples(open_dataset(root, max_pixels=settings.max_image_pixels))
        record = runtime.datasets.add_dataset(name, root, user)
    info = DatasetInfo.of(record)
    return DatasetUploadResponse(name=info.name, format=info.format, count=info.count,
                                 dataset=info)


@router.get("", response_model=DatasetListResponse, responses=problem_responses(503))
def list_datasets(datasets: DatasetsDep) -> DatasetListResponse:
    """Every dataset, by name."""
    return DatasetListResponse(datasets=[DatasetInfo.of(r) for r in datasets.list_datasets()])


@router.get("/{name}", response_model=DatasetInfo, responses=problem_responses(404, 422))
def get_dataset(name: NamePath, datasets: DatasetsDep) -> DatasetInfo:
    """One dataset's record."""
    return DatasetInfo.of(datasets.get_dataset(name))


@router.delete("/{name}", response_model=DatasetDeleteResponse,
               responses=problem_responses(401, 403, 404, 409, 422, 503))
def delete_dataset(_: AdminKey, name: NamePath, datasets: DatasetsDep) -> DatasetDeleteResponse:
    """Delete a dataset (adapters trained on it are kept)."""
    datasets.delete_dataset(name)
    return DatasetDeleteResponse(name=name, deleted=True)
