"""The client's result types against the service's response schemas: the same fields, so a
field the API adds or renames fails here rather than in a user's notebook. (The client cannot
import the service's schemas: the library imports nothing above it.)"""

from __future__ import annotations

import dataclasses

import pytest

from regcl.client import models
from service.api.schemas import adapters as adapter_schemas
from service.api.schemas import datasets, health, images, jobs, routing, segment, versions

# client type, server schema, {client field: the server fields it stands for}
PAIRS = [
    (models.ImageInfo, images.ImageUploadResponse, {}),
    (models.Mask, segment.MaskResult, {"mask": {"rle", "png"}}),
    (models.Segmentation, segment.SegmentResponse, {}),
    (models.BatchSegmentation, segment.SegmentBatchResponse, {}),
    (models.AdapterInfo, adapter_schemas.AdapterInfo, {}),
    (models.DatasetInfo, datasets.DatasetInfo, {}),
    (models.Job, jobs.JobInfo, {}),
    (models.VersionInfo, versions.VersionInfo, {}),
    (models.LiveVersion, versions.LiveVersionResponse, {}),
    (models.Activation, versions.ActivateResponse, {}),
    (models.MatrixCell, versions.MatrixCell, {}),
    (models.MatrixRow, versions.MatrixRow, {}),
    (models.Matrix, versions.ContinualMatrixResponse, {"domains": {"columns"}}),
    (models.Readiness, health.ReadinessResponse, {"ready": {"status"}}),
    (models.Route, routing.RouteInfo, {}),
    (models.RouterInfo, routing.RouterInfo, {}),
]


@pytest.mark.parametrize(("ours", "theirs", "renamed"), PAIRS,
                         ids=[p[0].__name__ for p in PAIRS])
def test_client_types_have_the_fields_of_the_api_responses(ours, theirs, renamed):
    client = {f.name for f in dataclasses.fields(ours)}
    server = set(theirs.model_fields)
    for field, stands_for in renamed.items():
        client = (client - {field}) | stands_for
    assert client == server
