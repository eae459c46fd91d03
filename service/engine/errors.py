"""Typed errors of the service, each stating the problem it is answered as.

:class:`ServiceError` is the base of every error the service raises about a request (the
engine's here, Label Studio's in :mod:`service.labelstudio.errors`, the HTTP layer's in
:mod:`service.api.errors`). It subclasses :class:`regcl.errors.RegclError` and ``ValueError``,
so callers can catch either; "not found" errors are also ``KeyError``s. Each class states its
problem: ``code`` (the last segment of the RFC 7807 ``type``), HTTP ``status`` and ``title``;
``expose`` says whether the message may be shown as ``detail`` (never for internal failures).
An instance may carry response ``headers`` (an auth challenge, ``Retry-After``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from regcl.errors import AdapterError, RegclError


class ServiceError(RegclError, ValueError):
    """Base class of the service's errors about a request (bad input, unknown names)."""

    code: ClassVar[str] = "bad-request"
    status: ClassVar[int] = 400
    title: ClassVar[str] = "Bad request"
    expose: ClassVar[bool] = True

    def __init__(self, message: str = "", *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = dict(headers or {})

    def __str__(self) -> str:  # KeyError subclasses would repr() the message
        return str(self.args[0]) if self.args else ""


class NotFoundError(ServiceError, KeyError):
    """Something a request names does not exist (any more)."""

    code, status, title = "not-found", 404, "Not found"


class ImageNotFoundError(NotFoundError):
    """The image id is unknown, or its image was evicted from the store: upload it again."""

    code, title = "image-not-found", "Image not found"


class UnknownAdapterError(NotFoundError):
    """The adapter name is neither ``base``, ``live``, ``auto`` nor a loaded or registered
    domain adapter."""

    code, title = "unknown-adapter", "Unknown adapter"


class LiveUnavailableError(ServiceError):
    """The live pointer names a version this process could not load yet (the artifact store
    away while it started) and it serves no earlier one: answering with the base model
    instead would hand out masks of another model than the other replicas'. Retried in the
    background; the request may succeed in a few seconds."""

    code, status, title = "live-unavailable", 503, "The live version is not loaded yet"


class InvalidImageError(ServiceError):
    """An image is not H x W x 3 uint8 with at least one pixel, is larger than the engine's
    whole image store, or its bytes are no image file."""

    code, status, title = "invalid-image", 422, "Invalid image"


class PromptError(ServiceError):
    """Base class of the errors about a segmentation prompt."""

    code, status, title = "invalid-prompt", 422, "Invalid prompt"


class EmptyPromptError(PromptError):
    """No points, no box and no mask input: nothing to segment."""

    code, title = "empty-prompt", "Empty prompt"


class PromptShapeError(PromptError):
    """A prompt array has the wrong shape (points not N x 2, labels not N, box not 4, ...)."""

    code, title = "prompt-shape", "Malformed prompt"


class NonFiniteValueError(PromptError):
    """A coordinate or mask-input value is NaN or infinite."""

    code, title = "non-finite-value", "Non-finite value in prompt"


class ValueOutOfRangeError(PromptError):
    """A mask-input logit is finite but so large that the model's arithmetic would overflow
    (its magnitude is above ``service.engine.prompt_checks.MAX_MASK_INPUT_ABS``)."""

    code, title = "value-out-of-range", "Prompt value out of range"


class OutOfBoundsError(PromptError):
    """A point or box lies outside the image (0 <= x <= W, 0 <= y <= H)."""

    code, title = "out-of-bounds", "Prompt outside the image"


class InvalidLabelError(PromptError):
    """A point label is not 0 (background) or 1 (foreground)."""

    code, title = "invalid-label", "Invalid point label"


class InvalidBoxError(PromptError):
    """A box has x1 < x0 or y1 < y0."""

    code, title = "invalid-box", "Invalid box"


class TooManyPointsError(PromptError):
    """More points than the engine's ``max_points``."""

    code, title = "too-many-points", "Too many points"


class DecoderNotSharedError(ServiceError):
    """An adapter being served changes the prompt encoder or mask decoder, so one exported
    decoder cannot serve every version (never the case while adapters are checked on load)."""

    code, status, title = "decoder-not-shared", 409, "The decoder differs between adapters"


class NonFiniteOutputError(ServiceError):
    """The model produced NaN or infinite scores: a fault of the served weights, never
    answered as numbers."""

    code, status, title, expose = "internal-error", 500, "Internal server error", False


class AdapterRejectedError(ServiceError, AdapterError):
    """An adapter was refused before serving it (wrong targets or shapes, non-finite values,
    LoRA outside the image encoder); the adapters being served are unchanged."""

    code, status, title = "adapter-rejected", 422, "Adapter rejected"
