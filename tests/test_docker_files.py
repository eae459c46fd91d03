"""The container files (docker-compose.yml, docker/*.Dockerfile, .dockerignore) against the code
they deploy: services and volumes, ``REGCL_*`` names that are real settings, commands that
resolve (the uvicorn app factory, the Celery app and its queues), health checks on real routes,
the worker's GPU reservation, and build inputs that exist and are not ignored.

No Docker here: the files are parsed (YAML, and Dockerfile instructions as text).
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from infra.settings import Settings, get_settings
from workers.runtime import DEVICE_ENV, THREADS_ENV

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
API_DOCKERFILE = REPO / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = REPO / "docker" / "worker.Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

# What the operator must supply (``${VAR:?...}`` in the compose file), as a test would.
REQUIRED_ENV = {"REGCL_ADMIN_KEYS": "compose-test-admin-key-0123456789"}
SETTING_NAMES = {f"REGCL_{name.upper()}" for name in Settings.model_fields}
KNOWN_ENV = SETTING_NAMES | {THREADS_ENV, DEVICE_ENV}  # + the worker-only variables


# -- parsing -----------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """The JSON (exec) form of CMD / ENTRYPOINT / HEALTHCHECK CMD: the shell form would
        run under /bin/sh as PID 1, which does not pass SIGTERM on."""
        args = self.args.split(" CMD ", 1)[1] if self.keyword == "HEALTHCHECK" else self.args
        value = json.loads(args)
        assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
        return value


def dockerfile(path: Path) -> list[Instruction]:
    """Instructions of a Dockerfile: continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, rest = (current + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(rest.split())))
        current = ""
    assert not current, f"{path}: dangling line continuation"
    return instructions


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.args):
                name, sep, value = word.partition("=")
                assert sep, f"use ENV NAME=value, got {instruction.args!r}"
                env[name] = value
    return env


_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, environ: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` against ``environ``."""
    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        present = name in environ and (bool(environ[name]) or not (op or "").startswith(":"))
        if present:
            return environ[name]
        if op in (":?", "?"):
            raise KeyError(f"{name} must be set: {arg}")
        return arg if op in (":-", "-") else ""

    return _VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def api_file() -> list[Instruction]:
    return dockerfile(API_DOCKERFILE)


@pytest.fixture(scope="module")
def worker_file() -> list[Instruction]:
    return dockerfile(WORKER_DOCKERFILE)


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as the container gets it (operator input: REQUIRED_ENV)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {name: interpolate(str(value), REQUIRED_ENV) for name, value in env.items()}


@pytest.fixture
def settings_from(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``settings_from(env)``: ``Settings()`` as a container with exactly ``env`` builds it
    (``get_settings``' cache cleared before and after)."""
    def build(env: Mapping[str, str]) -> Settings:
        for name in list(os.environ):
            if name.startswith("REGCL_"):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        return get_settings()

    yield build
    get_settings.cache_clear()


def mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Container path → volume name (short syntax ``name:/path[:mode]``)."""
    result = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        result[target] = source
    return result


def healthcheck_url(command: list[str] | str) -> tuple[int, str]:
    """(port, path) of the ``http://host:port/path`` a health check requests."""
    text = command if isinstance(command, str) else " ".join(command)
    match = re.search(r"https?://[^/:\s'\"]+:(?P<port>\d+)(?P<path>/[^\s'\"?]*)", text)
    assert match, f"no http://host:port/path in the health check {text!r}"
    return int(match["port"]), match["path"]


def option(argv: list[str], *names: str) -> str:
    for name in names:
        if name in argv:
            return argv[argv.index(name) + 1]
    raise AssertionError(f"{argv}: no {' / '.join(names)}")


def get_routes(app: Any) -> set[str]:
    """The app's GET paths, from its OpenAPI schema (FastAPI nests included routers, so
    ``app.routes`` does not list them all)."""
    return {path for path, operations in app.openapi()["paths"].items() if "get" in operations}


# -- compose -----------------------------------------------------------------------------------


def test_compose_defines_the_stack(compose, services):
    assert {"redis", "api", "worker"} <= set(services)
    for name, dockerfile_path in (("api", API_DOCKERFILE), ("worker", WORKER_DOCKERFILE)):
        build = services[name]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO, f"{name}: build from the repository root, not {context}"
        assert (context / build["dockerfile"]).resolve() == dockerfile_path
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for target, source in mounts(service).items():
            assert not source.startswith((".", "/")), f"{name}: {source} is a bind mount"
            assert source in declared, f"{name}: volume {source!r} (at {target}) not declared"


def test_redis_persists_and_reports_health(compose, services):
    redis = services["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1][0] == "7"
    command = redis["command"] if isinstance(redis["command"], list) else redis[
        "command"].split()
    assert option(command, "--appendonly") == "yes"
    assert "/data" in mounts(redis), "the append-only file must live on a volume"
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in test and "ping" in test


def test_api_and_worker_wait_for_redis(services):
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "redis" in services["worker"]["depends_on"]


def test_every_regcl_variable_is_a_real_setting():
    texts = {path.name: path.read_text() for path in (COMPOSE, API_DOCKERFILE,
                                                      WORKER_DOCKERFILE)}
    used = {name: set(re.findall(r"REGCL_[A-Z0-9_]+", text)) for name, text in texts.items()}
    assert used["docker-compose.yml"], "the compose file configures no REGCL_* setting"
    for name, names in used.items():
        unknown = names - KNOWN_ENV
        assert not unknown, f"{name} names variables regcl never reads: {sorted(unknown)}"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_compose_environment_builds_settings_for_the_stack(name, compose, services,
                                                           settings_from):
    env = service_env(services[name])
    assert all(key.startswith("REGCL_") for key in env)
    settings = settings_from(env)
    redis_host = settings.redis_url.split("://", 1)[1].split("/")[0]
    assert redis_host == "redis:6379", f"{name} reaches Redis at {redis_host}"
    volumes = mounts(services[name])
    assert str(settings.data_dir) in volumes, f"{name}: data_dir is not on a volume"
    assert settings.artifact_url in volumes, f"{name}: the artifact store is not on a volume"
    if name == "api":
        assert settings.mutations_enabled


def test_api_and_worker_share_their_settings_and_artifacts(services, settings_from):
    api = settings_from(service_env(services["api"]))
    worker = settings_from(service_env(services["worker"]))
    for field in ("redis_url", "artifact_url", "model", "checkpoint",
                  "job_visibility_timeout_s"):
        assert getattr(api, field) == getattr(worker, field), field
    api_volume = mounts(services["api"])[api.artifact_url]
    assert mounts(services["worker"])[worker.artifact_url] == api_volume
    assert mounts(services["api"])[str(api.data_dir)] != mounts(services["worker"])[
        str(worker.data_dir)], "each process keeps its own local state"


def test_the_worker_reserves_a_gpu(services):
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               and d.get("count") in (1, "all") for d in devices), devices


# -- the API image -----------------------------------------------------------------------------


def test_api_image_runs_the_app_factory_with_real_health_checks(api_file, services,
                                                               settings_from):
    assert only(api_file, "FROM").args.startswith("python:3.11-slim")
    argv = only(api_file, "CMD").exec_form()
    assert argv[0] == "uvicorn" and "--factory" in argv
    app_string = next(arg for arg in argv[1:] if not arg.startswith("-"))
    module_name, _, attr = app_string.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    assert callable(factory)
    assert option(argv, "--host") == "0.0.0.0"
    port = int(option(argv, "--port"))
    assert only(api_file, "EXPOSE").args.split("/")[0] == str(port)
    published = [str(p).rsplit(":", 1)[-1] for p in services["api"]["ports"]]
    assert str(port) in published, f"compose publishes {published}, uvicorn binds {port}"

    settings_from(service_env(services["api"]))
    app = factory()  # as `uvicorn --factory` calls it: settings from the environment
    assert app.state.settings.redis_url == "redis://redis:6379/0"
    routes = get_routes(app)
    checks = {"image": only(api_file, "HEALTHCHECK").exec_form(),
              "compose": services["api"]["healthcheck"]["test"]}
    for where, command in checks.items():
        check_port, path = healthcheck_url(command)
        assert check_port == port, f"{where} health check asks port {check_port}"
        assert path in routes, f"{where} health check asks {path}, not a route: {routes}"
    assert healthcheck_url(checks["compose"])[1] == "/readyz"


# -- the worker image --------------------------------------------------------------------------


def test_worker_image_runs_celery_on_the_routed_queues(worker_file, services, settings_from):
    base = only(worker_file, "FROM").args
    assert base.startswith(("nvidia/cuda:", "pytorch/pytorch:")) and "runtime" in base
    argv = only(worker_file, "CMD").exec_form()
    assert argv[:1] == ["celery"] and "worker" in argv
    assert option(argv, "--pool", "-P") == "solo"
    assert option(argv, "--concurrency", "-c") == "1"
    module = importlib.import_module(option(argv, "-A", "--app"))
    from workers.celery_app import ALL_QUEUES, QUEUE_OF

    settings_from(service_env(services["worker"]))
    try:
        app = module.app  # what `celery -A` looks for, built from the environment
        queues = set(option(argv, "-Q", "--queues").split(","))
        assert queues <= set(ALL_QUEUES), f"unknown queues {queues - set(ALL_QUEUES)}"
        routed = {route["queue"] for route in app.conf.task_routes.values()}
        assert set(QUEUE_OF.values()) <= routed and routed <= queues, (
            f"tasks are routed to {routed}, the worker consumes {queues}")
        assert app.conf.broker_url == "redis://redis:6379/0"
        app.close()
    finally:
        vars(module).pop("app", None)  # built lazily from Settings(); leave it unbuilt


# -- build inputs ------------------------------------------------------------------------------


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether ``.dockerignore`` drops ``path`` (or a folder above it) from the context."""
    parts = Path(path).parts
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pattern in patterns:
            pattern = pattern.strip("/")
            if pattern.startswith("**/"):
                if fnmatch.fnmatch(parts[i - 1], pattern.removeprefix("**/")):
                    return True
            elif fnmatch.fnmatch(prefix, pattern):
                return True
    return False


@pytest.mark.parametrize("path", [API_DOCKERFILE, WORKER_DOCKERFILE], ids=["api", "worker"])
def test_images_install_the_whole_project_from_a_clean_context(path):
    instructions = dockerfile(path)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions: extend _ignored first"
    copied: set[str] = set()
    for instruction in instructions:
        if instruction.keyword == "COPY" and "--from" not in instruction.args:
            *sources, _ = instruction.args.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: no such path"
                assert not _ignored(source, patterns), f"COPY {source}: .dockerignore drops it"
                copied.add(Path(source).as_posix())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        needed |= {p.name for p in REPO.iterdir()
                   if p.is_dir() and fnmatch.fnmatch(p.name, pattern)
                   and (p / "__init__.py").exists()}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    assert any(i.keyword == "RUN" and re.search(r"\bpip install\b.*\s\.(\s|$)", i.args + " ")
               for i in instructions), "the project is not pip-installed"
    python = SpecifierSet(pyproject["project"]["requires-python"])
    text = " ".join(i.args for i in instructions if i.keyword in ("FROM", "RUN"))
    versions = set(re.findall(r"python:?(3\.\d+)", text))
    assert versions and all(python.contains(f"{v}.0") for v in versions), versions
    for name in dockerfile_env(instructions):
        if name.startswith("REGCL_"):
            assert name in KNOWN_ENV, name
