"""The typed HTTP client of the regcl service: what a notebook, ``regcl demo``, ``regcl bench
serve`` and the cross-process tests use to talk to the API.

    from regcl.client import Client

    c = Client("http://127.0.0.1:8000", admin_key="...")
    r = c.segment(image, points=[[x, y]])      # r.masks[i].mask: H x W bool; r.adapter_version

Modules: :mod:`~regcl.client.client` (:class:`Client`), :mod:`~regcl.client.models` (what it
returns), :mod:`~regcl.client.errors` (what it raises, mapped from problem+json),
:mod:`~regcl.client.encoding` (images, masks, logits and events on the wire). The client needs
httpx, numpy, Pillow and pycocotools, and nothing of the service.
"""

from regcl.client.client import DEFAULT_URL, VERSION_HEADER, Client
from regcl.client.errors import (
    ApiConnectionError,
    ApiError,
    AuthError,
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    ProtocolError,
    ServiceUnavailableError,
    UnauthorizedError,
    WaitTimeoutError,
)
from regcl.client.models import (
    Activation,
    AdapterInfo,
    BatchSegmentation,
    DatasetInfo,
    Embedding,
    ImageInfo,
    Job,
    JobEvent,
    LiveVersion,
    Mask,
    Matrix,
    Readiness,
    Route,
    RouterInfo,
    Segmentation,
    VersionInfo,
)

__all__ = [
    "DEFAULT_URL",
    "VERSION_HEADER",
    "Activation",
    "AdapterInfo",
    "ApiConnectionError",
    "ApiError",
    "AuthError",
    "BatchSegmentation",
    "Client",
    "ConflictError",
    "DatasetInfo",
    "Embedding",
    "ForbiddenError",
    "ImageInfo",
    "InvalidRequestError",
    "Job",
    "JobEvent",
    "JobFailedError",
    "JobTimeoutError",
    "LiveVersion",
    "Mask",
    "Matrix",
    "NotFoundError",
    "PayloadTooLargeError",
    "ProtocolError",
    "Readiness",
    "Route",
    "RouterInfo",
    "Segmentation",
    "ServiceUnavailableError",
    "UnauthorizedError",
    "VersionInfo",
    "WaitTimeoutError",
]
