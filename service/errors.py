"""Typed errors of the serving engine.

Every error subclasses :class:`regcl.errors.RegclError` and ``ValueError`` (through
:class:`ServiceError`, or :class:`regcl.errors.AdapterError` for refused adapters), so callers
can catch either. Each class has a stable ``code`` (kebab-case) that the HTTP layer can use as
the RFC 7807 problem ``type``; "not found" errors are also ``KeyError``s.
"""

from __future__ import annotations

from typing import ClassVar

from regcl.errors import AdapterError, RegclError


class ServiceError(RegclError, ValueError):
    """Base class of the engine's errors about a request (bad input, unknown names)."""

    code: ClassVar[str] = "service-error"


class NotFoundError(ServiceError, KeyError):
    """Something a request names does not exist (any more)."""

    code = "not-found"

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ImageNotFoundError(NotFoundError):
    """The image id is unknown, or its image was evicted from the store: upload it again."""

    code = "image-not-found"


class UnknownAdapterError(NotFoundError):
    """The adapter name is neither ``base``, ``live`` nor a loaded domain adapter."""

    code = "unknown-adapter"


class InvalidAdapterNameError(ServiceError):
    """A domain adapter name is reserved (``base``, ``live``) or not ``[A-Za-z0-9][A-Za-z0-9_.-]*``
    of at most 64 characters."""

    code = "invalid-adapter-name"


class InvalidImageError(ServiceError):
    """An image array is not H x W x 3 uint8 with at least one pixel, or is larger than the
    engine's whole image store."""

    code = "invalid-image"


class PromptError(ServiceError):
    """Base class of the errors about a segmentation prompt."""

    code = "invalid-prompt"


class EmptyPromptError(PromptError):
    """No points, no box and no mask input: nothing to segment."""

    code = "empty-prompt"


class PromptShapeError(PromptError):
    """A prompt array has the wrong shape (points not N x 2, labels not N, box not 4, ...)."""

    code = "prompt-shape"


class NonFiniteValueError(PromptError):
    """A coordinate or mask-input value is NaN or infinite."""

    code = "non-finite-value"


class ValueOutOfRangeError(PromptError):
    """A mask-input logit is finite but so large that the model's arithmetic would overflow
    (its magnitude is above ``service.prompts.MAX_MASK_INPUT_ABS``)."""

    code = "value-out-of-range"


class OutOfBoundsError(PromptError):
    """A point or box lies outside the image (0 <= x <= W, 0 <= y <= H)."""

    code = "out-of-bounds"


class InvalidLabelError(PromptError):
    """A point label is not 0 (background) or 1 (foreground)."""

    code = "invalid-label"


class InvalidBoxError(PromptError):
    """A box has x1 < x0 or y1 < y0."""

    code = "invalid-box"


class TooManyPointsError(PromptError):
    """More points than the engine's ``max_points``."""

    code = "too-many-points"


class DecoderNotSharedError(ServiceError):
    """An adapter being served changes the prompt encoder or mask decoder, so one exported
    decoder cannot serve every version (never the case while adapters are checked on load)."""

    code = "decoder-not-shared"


class AdapterRejectedError(AdapterError):
    """An adapter was refused before serving it (wrong targets or shapes, non-finite values,
    LoRA outside the image encoder); the adapters being served are unchanged."""

    code: ClassVar[str] = "adapter-rejected"
