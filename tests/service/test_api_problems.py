"""The problem+json mapping and the auth dependencies, in process (no server needed): every
typed error gets its status and stable type, internal errors never show their message, and
the key checks answer 401 / 403 as documented."""

from __future__ import annotations

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from infra import errors as infra_errors
from infra.settings import Settings
from regcl import errors as regcl_errors
from service.api import errors as api_errors
from service.api.deps import check_admin, check_segment_access
from service.api.problems import (
    FOREIGN,
    PROBLEM_BASE,
    install_problem_handlers,
    kind_of,
    service_error_kinds,
)
from service.engine import errors as service_errors
from service.engine.errors import ServiceError
from service.labelstudio import errors as ls_errors

KEY = "k" * 20
SECRET = "password=hunter2 at /srv/secret/path"

CASES = [
    (service_errors.OutOfBoundsError("x"), 422, "out-of-bounds"),
    (service_errors.ImageNotFoundError("x"), 404, "image-not-found"),
    (service_errors.AdapterRejectedError("x"), 422, "adapter-rejected"),
    (service_errors.NonFiniteOutputError("x"), 500, "internal-error"),
    (ls_errors.LabelStudioUnreachableError("x"), 502, "label-studio-unreachable"),
    (api_errors.UnauthorizedError("x"), 401, "unauthorized"),
    (api_errors.JobsUnavailableError("x"), 503, "jobs-unavailable"),
    (regcl_errors.StatsError("x"), 422, "invalid-stats"),
    (regcl_errors.DataError("x"), 422, "invalid-data"),
    (regcl_errors.ConfigError("x"), 422, "invalid-argument"),
    (infra_errors.NotFound("x"), 404, "not-found"),
    (infra_errors.LockTimeout("x"), 409, "lock-timeout"),
    (infra_errors.InvalidTransition("x"), 409, "invalid-transition"),
    (infra_errors.Conflict("x"), 409, "conflict"),
    (infra_errors.InvalidName("x"), 422, "invalid-name"),
    (redis.exceptions.ConnectionError("x"), 503, "backend-unavailable"),
    (regcl_errors.CheckpointError("x"), 500, "checkpoint-error"),
    (RuntimeError("x"), 500, "internal-error"),
]


@pytest.mark.parametrize(("exc", "status", "code"), CASES,
                         ids=[type(c[0]).__name__ for c in CASES])
def test_each_error_kind_has_a_status_and_a_stable_type(exc, status, code):
    kind = kind_of(exc)
    assert (kind.status, kind.code, kind.type) == (status, code, PROBLEM_BASE + code)


def test_codes_are_unique_per_kind():
    """One problem type, one status and title, wherever it is raised."""
    codes = {}
    for kind in [*FOREIGN.values(), *service_error_kinds().values()]:
        stated = (kind.status, kind.title)
        assert codes.setdefault(kind.code, stated) == stated, kind.code


def test_every_service_error_states_its_own_problem():
    """A subclass that forgot its own code would answer as its parent: each class states one
    (the bases are the only ones meant to be shared)."""
    for cls in service_error_kinds():
        assert "code" in vars(cls) or cls is ServiceError, cls


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError(SECRET)

    @app.get("/redis")
    def redis_down() -> None:
        raise redis.exceptions.ConnectionError(SECRET)

    @app.get("/corrupt")
    def corrupt() -> None:
        raise infra_errors.CorruptArtifact(SECRET)

    @app.get("/prompt")
    def prompt() -> None:
        raise service_errors.InvalidBoxError("box must have x0 <= x1")

    return TestClient(app, raise_server_exceptions=False)


def test_internal_errors_never_leak(client):
    for path, status, code in (("/boom", 500, "internal-error"),
                               ("/redis", 503, "backend-unavailable"),
                               ("/corrupt", 500, "corrupt-artifact")):
        response = client.get(path)
        assert response.status_code == status
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["type"] == PROBLEM_BASE + code and "detail" not in body
        assert "hunter2" not in response.text and "/srv" not in response.text


def test_typed_errors_show_their_message(client):
    body = client.get("/prompt").json()
    assert body == {"type": PROBLEM_BASE + "invalid-box", "title": "Invalid box",
                    "status": 422, "detail": "box must have x0 <= x1", "instance": "/prompt"}


def _settings(**values) -> Settings:
    return Settings(redis_url="redis://127.0.0.1:1/0", **values)


def _code(call) -> str | None:
    try:
        call()
    except ServiceError as exc:
        return exc.code
    return None


def test_admin_key_checks():
    with_keys = _settings(admin_keys=KEY)
    assert _code(lambda: check_admin(with_keys, KEY)) is None
    assert _code(lambda: check_admin(with_keys, None)) == "unauthorized"
    assert _code(lambda: check_admin(with_keys, KEY + "x")) == "unauthorized"
    no_keys = _settings()
    assert _code(lambda: check_admin(no_keys, KEY)) == "mutations-disabled"


def test_segmentation_is_open_unless_configured():
    assert _code(lambda: check_segment_access(_settings(admin_keys=KEY), None)) is None
    closed = _settings(admin_keys=KEY, segment_requires_key=True)
    assert _code(lambda: check_segment_access(closed, None)) == "unauthorized"
    assert _code(lambda: check_segment_access(closed, KEY)) is None
