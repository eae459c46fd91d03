"""The HTTP layer: routers per resource, their schemas, auth, problem+json errors (one table),
the OpenAPI document, upload handling, metrics, and the runtime the routes reach through
:mod:`service.api.deps`."""
