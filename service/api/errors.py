"""Typed errors of the HTTP layer itself: auth, request size and form, uploads, job queue.

Each is a :class:`service.engine.errors.ServiceError` that states its problem (code, status,
title); routes raise them like any other typed error.
"""

from __future__ import annotations

from service.engine.errors import ServiceError

__all__ = [
    "InvalidArchiveError",
    "InvalidBase64Error",
    "InvalidJsonFieldError",
    "JobsUnavailableError",
    "MissingStatsError",
    "MutationsDisabledError",
    "PayloadTooLargeError",
    "ServiceStartingError",
    "UnauthorizedError",
    "UnsafeFileError",
    "UnsupportedMediaTypeError",
]


class UnauthorizedError(ServiceError):
    """No key, or not an admin key, where one is needed."""

    code, status, title = "unauthorized", 401, "Missing or wrong API key"


class MutationsDisabledError(ServiceError):
    """No admin key is configured, so nothing can be changed."""

    code, status, title = ("mutations-disabled", 403,
                           "Mutations are disabled (no admin key configured)")


class PayloadTooLargeError(ServiceError):
    """A request body, an upload, or an archive's contents over their limit."""

    code, status, title = "payload-too-large", 413, "Payload too large"


class UnsupportedMediaTypeError(ServiceError):
    """A body of a media type the route does not take."""

    code, status, title = "unsupported-media-type", 415, "Unsupported media type"


class InvalidBase64Error(ServiceError):
    """A base64 field that does not decode."""

    code, status, title = "invalid-base64", 422, "Invalid base64 data"


class InvalidJsonFieldError(ServiceError):
    """A string field (a form field, Label Studio's extra params) that must hold a JSON
    object and does not."""

    code, status, title = "invalid-json-field", 422, "Field is not a JSON object"


class UnsafeFileError(ServiceError):
    """A file refused by its name or place: pickle-based weights, paths out of an archive,
    links, hidden files."""

    code, status, title = "unsafe-file", 422, "Unsafe file refused"


class InvalidArchiveError(ServiceError):
    """An upload that is no readable zip archive, or one that holds nothing usable."""

    code, status, title = "invalid-archive", 422, "Invalid archive"


class MissingStatsError(ServiceError):
    """A merge needs Gram statistics that the adapter lacks."""

    code, status, title = "missing-stats", 409, "Adapter has no statistics"


class JobsUnavailableError(ServiceError):
    """This deployment has no job queue (the workers package is not installed)."""

    code, status, title = "jobs-unavailable", 503, "Job submission is not available"


class ServiceStartingError(ServiceError):
    """The process has not finished loading the model yet."""

    code, status, title = "backend-unavailable", 503, "A backend service is unavailable"
