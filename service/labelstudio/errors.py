"""Typed errors of the Label Studio backend, each with its stable problem ``code``.

All are :class:`service.errors.ServiceError` (so ``RegclError`` and ``ValueError``);
:data:`KINDS` gives each its HTTP status and title for :mod:`service.problems`.
"""

from __future__ import annotations

from service.errors import ServiceError

__all__ = [
    "KINDS",
    "ForeignImageUrlError",
    "ImageTooLargeError",
    "ImageUnavailableError",
    "InvalidLabelConfigError",
    "InvalidRegionError",
    "LabelStudioError",
    "LabelStudioNotConfiguredError",
    "LabelStudioUnreachableError",
    "MalformedPayloadError",
    "NotEnoughSamplesError",
    "UnsupportedResultTypeError",
]


class LabelStudioError(ServiceError):
    """Base class of the Label Studio backend's errors."""

    code = "label-studio-error"


class ForeignImageUrlError(LabelStudioError):
    """A task's image URL (or a redirect) points outside REGCL_LABEL_STUDIO_URL's origin."""

    code = "foreign-image-url"


class ImageUnavailableError(LabelStudioError):
    """Label Studio refused the image (4xx), or the task names no image."""

    code = "image-unavailable"


class ImageTooLargeError(LabelStudioError):
    """The image is larger than REGCL_LABEL_STUDIO_MAX_IMAGE_BYTES."""

    code = "image-too-large"


class LabelStudioUnreachableError(LabelStudioError):
    """Label Studio did not answer in time, or answered with a server error."""

    code = "label-studio-unreachable"


class LabelStudioNotConfiguredError(LabelStudioError):
    """REGCL_LABEL_STUDIO_URL is not set, so no image can be fetched."""

    code = "label-studio-not-configured"


class UnsupportedResultTypeError(LabelStudioError):
    """A region of a type the backend does not handle (it handles keypointlabels and
    rectanglelabels as prompts, brushlabels as masks)."""

    code = "unsupported-result-type"


class MalformedPayloadError(LabelStudioError):
    """A request lacks an object the protocol needs (project, annotation, task) or an id is
    not an id."""

    code = "invalid-payload"


class InvalidRegionError(LabelStudioError):
    """A region is malformed: missing or non-finite values, a rotated rectangle..."""

    code = "invalid-region"


class InvalidLabelConfigError(LabelStudioError):
    """The labeling config does not parse, or has no Image or no BrushLabels tag."""

    code = "invalid-label-config"


class NotEnoughSamplesError(LabelStudioError):
    """Training asked for a project whose sample set is too small to split."""

    code = "not-enough-samples"


KINDS: dict[type[LabelStudioError], tuple[int, str]] = {
    ForeignImageUrlError: (422, "Image URL outside Label Studio"),
    ImageUnavailableError: (422, "Image not available from Label Studio"),
    ImageTooLargeError: (422, "Image too large"),
    LabelStudioUnreachableError: (502, "Label Studio unreachable"),
    LabelStudioNotConfiguredError: (503, "Label Studio is not configured"),
    UnsupportedResultTypeError: (422, "Unsupported result type"),
    MalformedPayloadError: (422, "Malformed Label Studio payload"),
    InvalidRegionError: (422, "Invalid region"),
    InvalidLabelConfigError: (422, "Invalid labeling config"),
    NotEnoughSamplesError: (409, "Not enough annotations"),
}
