"""Typed errors of the Label Studio backend, each stating its problem (code, status, title).

All are :class:`service.engine.errors.ServiceError` (so ``RegclError`` and ``ValueError``).
"""

from __future__ import annotations

from service.engine.errors import ServiceError

__all__ = [
    "ForeignImageUrlError",
    "ImageTooLargeError",
    "ImageUnavailableError",
    "InvalidExtraParamsError",
    "InvalidLabelConfigError",
    "InvalidRegionError",
    "LabelStudioError",
    "LabelStudioNotConfiguredError",
    "LabelStudioNotFoundError",
    "LabelStudioTokenRefusedError",
    "LabelStudioUnreachableError",
    "MalformedPayloadError",
    "NoPreencodeError",
    "NotEnoughSamplesError",
    "PreencodeAdapterError",
    "PreencodeDisabledError",
    "StorageHostRefusedError",
    "UnsupportedResultTypeError",
]


class LabelStudioError(ServiceError):
    """Base class of the Label Studio backend's errors."""

    code, status, title = "label-studio-error", 422, "Label Studio request refused"


class ForeignImageUrlError(LabelStudioError):
    """A task's image URL (or a redirect) points outside REGCL_LABEL_STUDIO_URL's origin."""

    code, status, title = "foreign-image-url", 422, "Image URL outside Label Studio"


class StorageHostRefusedError(ForeignImageUrlError):
    """Label Studio redirected an image to a storage host that REGCL_LABEL_STUDIO_STORAGE_HOSTS
    does not list, or to an address such an entry may not reach (loopback, link-local,
    metadata, private for a wildcard entry)."""

    code, status, title = "storage-host-refused", 422, "Storage host not allowed"


class ImageUnavailableError(LabelStudioError):
    """Label Studio refused the image (4xx), or the task names no image."""

    code, status, title = "image-unavailable", 422, "Image not available from Label Studio"


class ImageTooLargeError(LabelStudioError):
    """The image is larger than REGCL_LABEL_STUDIO_MAX_IMAGE_BYTES."""

    code, status, title = "image-too-large", 422, "Image too large"


class LabelStudioUnreachableError(LabelStudioError):
    """Label Studio did not answer in time, or answered with a server error."""

    code, status, title = "label-studio-unreachable", 502, "Label Studio unreachable"


class LabelStudioTokenRefusedError(LabelStudioError):
    """Label Studio refused REGCL_LABEL_STUDIO_API_KEY (401): a revoked or expired personal
    access token, a legacy token where legacy tokens are off, another Label Studio's token."""

    code, status, title = "label-studio-token-refused", 502, "Label Studio refused regcl's token"


class LabelStudioNotFoundError(LabelStudioError):
    """Label Studio has no such object (a project to sync), or does not let the token's
    user see it (404, 403)."""

    code, status, title = "label-studio-not-found", 404, "Not found in Label Studio"


class LabelStudioNotConfiguredError(LabelStudioError):
    """REGCL_LABEL_STUDIO_URL is not set, so no image can be fetched."""

    code, status, title = "label-studio-not-configured", 503, "Label Studio is not configured"


class UnsupportedResultTypeError(LabelStudioError):
    """A region of a type the backend does not handle (it handles keypointlabels and
    rectanglelabels as prompts, brushlabels as masks)."""

    code, status, title = "unsupported-result-type", 422, "Unsupported result type"


class MalformedPayloadError(LabelStudioError):
    """A request lacks an object the protocol needs (project, annotation, task) or an id is
    not an id."""

    code, status, title = "invalid-payload", 422, "Malformed Label Studio payload"


class InvalidRegionError(LabelStudioError):
    """A region is malformed: missing or non-finite values, a rotated rectangle..."""

    code, status, title = "invalid-region", 422, "Invalid region"


class InvalidExtraParamsError(LabelStudioError):
    """A connection's extra params that are no JSON object."""

    code, status, title = "invalid-extra-params", 422, "Extra params are not a JSON object"


class InvalidLabelConfigError(LabelStudioError):
    """The labeling config does not parse, or has no Image or no BrushLabels tag."""

    code, status, title = "invalid-label-config", 422, "Invalid labeling config"


class NotEnoughSamplesError(LabelStudioError):
    """Training asked for a project whose sample set is too small to split."""

    code, status, title = "not-enough-samples", 409, "Not enough annotations"



class PreencodeAdapterError(LabelStudioError):
    """A pre-encode was asked for with ``auto``, which chooses an adapter per click."""

    code, status, title = "preencode-adapter", 422, "Adapter cannot be pre-encoded"


class PreencodeDisabledError(LabelStudioError):
    """Pre-encoding is off: REGCL_LABEL_STUDIO_PREENCODE_MAX_BYTES is 0, or the process has no
    embedding store."""

    code, status, title = "preencode-disabled", 409, "Pre-encoding is disabled"


class NoPreencodeError(LabelStudioError):
    """The project has no pre-encode job (or none active, to cancel)."""

    code, status, title = "no-preencode", 404, "No pre-encode job"
