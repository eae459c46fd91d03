"""The container files (docker-compose.yml, docker/Dockerfile, docker/redis.Dockerfile,
.dockerignore, the scripts that build them) against the code they deploy: services, profiles
and volumes, ``REGCL_*`` names that are real settings, the worker's device as the code reads
it, commands that resolve (the uvicorn app factory, the Celery app and its queues), health
checks on real routes, build inputs that exist and are not ignored, and the dependencies
installed from the hash-checked runtime lock, with no index or certificate in the images and no
instruction that needs BuildKit.

No Docker here: the files are parsed (YAML, and Dockerfile instructions as text).
scripts/docker_check.sh builds and runs them for real (opt-in: it downloads gigabytes).
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from infra.settings import Settings, get_settings
from workers.runtime import DEVICE_ENV, THREADS_ENV, WorkerRuntime

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
REDIS_DOCKERFILE = REPO / "docker" / "redis.Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
SCRIPTS = [REPO / "scripts" / "docker_check.sh", REPO / "docker" / "make_local_bases.sh"]
WORKERS = ("worker", "worker-cpu")  # the GPU worker and its CPU variant

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


@dataclass
class Stage:
    """One ``FROM`` of a Dockerfile: its base (an image or an earlier stage) and instructions."""

    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    args: dict[str, str]  # ARG NAME=default before the first FROM
    stages: list[Stage]

    def chain(self, target: str | None = None) -> list[Instruction]:
        """What an image built with ``--target target`` (default: the last stage) runs: the
        instructions of its stage and of the stages it is built on, oldest first."""
        stages = {stage.name: stage for stage in self.stages}
        stage = stages[target] if target else self.stages[-1]
        instructions = list(stage.instructions)
        while stage.base in stages:
            stage = stages[stage.base]
            instructions = stage.instructions + instructions
        return instructions

    def root_image(self, target: str | None = None) -> str:
        """The image the target is built on, with ``${ARG}`` replaced by the ARG's default."""
        stages = {stage.name: stage for stage in self.stages}
        stage = stages[target] if target else self.stages[-1]
        while stage.base in stages:
            stage = stages[stage.base]
        return interpolate(stage.base, self.args)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Continuation lines joined, comments dropped, split into stages at each ``FROM``."""
    lines: list[Instruction] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, rest = (current + line).partition(" ")
        lines.append(Instruction(keyword.upper(), " ".join(rest.split())))
        current = ""
    assert not current, f"{path}: dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in lines:
        if instruction.keyword == "FROM":
            base, _, name = instruction.args.partition(" AS ")
            stages.append(Stage(base.strip(), name.strip() or str(len(stages))))
        elif stages:
            stages[-1].instructions.append(instruction)
        else:
            assert instruction.keyword == "ARG", f"{path}: {instruction} before FROM"
            name, _, default = instruction.args.partition("=")
            args[name] = default.strip('"')
    return Dockerfile(args, stages)


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
def images() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE)


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as the container gets it (operator input: REQUIRED_ENV)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {name: interpolate(str(value), REQUIRED_ENV) for name, value in env.items()}


@pytest.fixture
def settings_from(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``settings_from(env)``: ``Settings()`` as a container with exactly ``env`` builds it
    (``get_settings``' cache cleared before and after; ``env`` stays set for the test)."""
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


def gpu_reservations(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    devices = (service.get("deploy") or {}).get("resources", {}).get("reservations", {})
    return [d for d in devices.get("devices", [])
            if d.get("driver") == "nvidia" or "gpu" in d.get("capabilities", [])]


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


def test_compose_defines_the_stack(compose, services, images):
    assert {"redis", "api", *WORKERS} <= set(services)
    stage_names = {stage.name for stage in images.stages}
    for name, target in (("api", "api"), *((w, "worker") for w in WORKERS)):
        build = services[name]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO, f"{name}: build from the repository root, not {context}"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] == target and target in stage_names, (name, build)
    assert services["worker"]["image"] == services["worker-cpu"]["image"], "one worker image"
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for target, source in mounts(service).items():
            assert not source.startswith((".", "/")), f"{name}: {source} is a bind mount"
            assert source in declared, f"{name}: volume {source!r} (at {target}) not declared"


def test_redis_persists_and_reports_health(services):
    redis = services["redis"]
    image = interpolate(redis["image"], {})
    assert image.split(":")[0] == "redis" and image.split(":")[1][0] == "7", image
    command = redis["command"] if isinstance(redis["command"], list) else redis[
        "command"].split()
    assert command[0] == "redis-server" and option(command, "--appendonly") == "yes"
    assert "/data" in mounts(redis), "the append-only file must live on a volume"
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in test and "ping" in test
    assert "ports" not in redis, "Redis, without a password, must not be published"


def test_the_local_redis_image_keeps_the_official_contract(services):
    """docker/redis.Dockerfile (Debian's redis-server) stands in for redis:7: the compose
    command, health check and /data volume must work on it as on the official image."""
    redis = parse_dockerfile(REDIS_DOCKERFILE)
    instructions = redis.chain()
    installs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert re.search(r"apt-get install .*\bredis-server\b", installs)  # redis-cli comes along
    assert only(instructions, "WORKDIR").args == "/data"
    assert only(instructions, "USER").args not in ("root", "0")
    assert only(instructions, "CMD").exec_form()[0] == services["redis"]["command"][0]
    assert redis.root_image().startswith("debian:bookworm"), "the release redis:7 is built on"


@pytest.mark.parametrize("name", ["api", *WORKERS])
def test_compose_environment_builds_settings_for_the_stack(name, services, settings_from):
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


def test_every_regcl_variable_is_a_real_setting():
    for path in (COMPOSE, DOCKERFILE, REDIS_DOCKERFILE):
        unknown = set(re.findall(r"REGCL_[A-Z0-9_]+", path.read_text())) - KNOWN_ENV
        assert not unknown, f"{path.name} names variables regcl never reads: {sorted(unknown)}"
    assert re.search(r"REGCL_[A-Z0-9_]+", COMPOSE.read_text()), "compose configures nothing"


@pytest.mark.parametrize("worker", WORKERS)
def test_api_and_workers_share_their_settings_and_artifacts(worker, services, settings_from):
    api = settings_from(service_env(services["api"]))
    other = settings_from(service_env(services[worker]))
    for name in ("redis_url", "artifact_url", "model", "checkpoint",
                 "job_visibility_timeout_s"):
        assert getattr(api, name) == getattr(other, name), name
    api_volume = mounts(services["api"])[api.artifact_url]
    assert mounts(services[worker])[other.artifact_url] == api_volume
    assert mounts(services["api"])[str(api.data_dir)] != mounts(services[worker])[
        str(other.data_dir)], "each process keeps its own local state"


@pytest.mark.parametrize(("profile", "device"), [("gpu", "cuda"), ("cpu", "cpu")])
def test_each_profile_runs_one_worker_on_its_device(profile, device, services, settings_from):
    """``docker compose --profile gpu|cpu up``: the services without a profile plus that
    profile's. The gpu profile's worker trains where the code puts it, on the reserved GPU;
    the cpu profile reserves no GPU (compose refuses to start it on a host without one)."""
    started = {name: s for name, s in services.items()
               if not s.get("profiles") or profile in s["profiles"]}
    assert {"redis", "api"} <= set(started)
    workers = [name for name, s in started.items() if s.get("build", {}).get("target")
               == "worker"]
    assert len(workers) == 1, f"--profile {profile} starts the workers {workers}"
    env = service_env(started[workers[0]])
    runtime = WorkerRuntime(settings_from(env))  # reads REGCL_WORKER_DEVICE as a worker does
    assert runtime.device.type == device, f"--profile {profile}: the worker uses {runtime.device}"
    reserved = [d for s in started.values() for d in gpu_reservations(s)]
    if device == "cuda":
        assert len(reserved) == 1 and reserved[0].get("count") in (1, "all") \
            and "gpu" in reserved[0]["capabilities"], reserved
        assert gpu_reservations(started[workers[0]]) == reserved
    else:
        assert not reserved, f"--profile cpu asks for a GPU: {reserved}"


def test_without_a_profile_the_api_still_starts(services):
    """The services without a profile are the ones every profile starts: Redis and the API."""
    assert {name for name, s in services.items() if not s.get("profiles")} == {"redis", "api"}


# -- the images --------------------------------------------------------------------------------


def test_both_images_share_one_python_base(images):
    assert images.args.get("BASE", "").startswith("python:3.11-slim"), images.args
    stages = {stage.name: stage for stage in images.stages}
    common = stages["api"].base
    assert stages["worker"].base == common and common in stages, "no stage in common"
    assert stages[common].base == "${BASE}" and images.root_image("api") == images.args["BASE"]
    venv = [i for i in stages[common].instructions
            if i.keyword == "COPY" and i.args.startswith("--from=")]
    assert venv, "the dependencies (torch: gigabytes) are not in the layers both images share"
    source = venv[0].args.split()[0].removeprefix("--from=")
    assert stages[source].base == "${BASE}", "the venv must be made on the images' own base"
    order = stages[common].instructions
    first_source_copy = next(i for i, c in enumerate(order)
                             if c.keyword == "COPY" and c.args.split()[0] == "regcl")
    assert order.index(venv[0]) < first_source_copy, "source edits would copy the venv again"


def test_api_image_runs_the_app_factory_with_real_health_checks(images, services,
                                                               settings_from):
    instructions = images.chain("api")
    argv = only(instructions, "CMD").exec_form()
    assert argv[0] == "uvicorn" and "--factory" in argv
    app_string = next(arg for arg in argv[1:] if not arg.startswith("-"))
    module_name, _, attr = app_string.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    assert callable(factory)
    assert option(argv, "--host") == "0.0.0.0"
    port = int(option(argv, "--port"))
    assert only(instructions, "EXPOSE").args.split("/")[0] == str(port)
    published = [interpolate(str(p), {}).rsplit(":", 1)[-1] for p in services["api"]["ports"]]
    assert str(port) in published, f"compose publishes {published}, uvicorn binds {port}"

    settings_from(service_env(services["api"]))
    app = factory()  # as `uvicorn --factory` calls it: settings from the environment
    assert app.state.settings.redis_url == "redis://redis:6379/0"
    routes = get_routes(app)
    checks = {"image": only(instructions, "HEALTHCHECK").exec_form(),
              "compose": services["api"]["healthcheck"]["test"]}
    for where, command in checks.items():
        check_port, path = healthcheck_url(command)
        assert check_port == port, f"{where} health check asks port {check_port}"
        assert path in routes, f"{where} health check asks {path}, not a route: {routes}"
    assert healthcheck_url(checks["compose"])[1] == "/readyz"


def test_worker_image_runs_celery_on_the_routed_queues(images, services, settings_from):
    instructions = images.chain("worker")
    argv = only(instructions, "CMD").exec_form()
    assert argv[:1] == ["celery"] and "worker" in argv
    assert option(argv, "--pool", "-P") == "solo"
    assert option(argv, "--concurrency", "-c") == "1"
    caps = dockerfile_env(instructions).get("NVIDIA_DRIVER_CAPABILITIES", "")
    assert "compute" in caps.split(","), "the toolkit would mount no CUDA driver library"
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
    """Whether ``.dockerignore`` drops ``path`` from the context: the last pattern that matches
    the path or a folder above it decides, and a ``!pattern`` keeps what it matches."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for line in patterns:
        keep = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern.removeprefix("**/")) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            ignored = not keep
    return ignored


def test_dockerignore_exceptions_keep_what_they_name():
    patterns = ["docker", "!docker/certs", "requirements", "!requirements/main.txt"]
    assert _ignored("docker/Dockerfile", patterns)
    assert not _ignored("docker/certs/", patterns)
    assert _ignored("requirements/dev.txt", patterns)
    assert not _ignored("requirements/main.txt", patterns)
    assert not _ignored("regcl", patterns)


def _dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_every_copy_source_exists_and_is_in_the_context(images):
    patterns = _dockerignore_patterns()
    for stage in images.stages:
        for instruction in stage.instructions:
            if instruction.keyword == "COPY" and "--from" not in instruction.args:
                *sources, _ = instruction.args.split()
                for source in sources:
                    assert (REPO / source).exists(), f"COPY {source}: no such path"
                    assert not _ignored(source, patterns), f"COPY {source}: .dockerignore drops it"


@pytest.mark.parametrize("target", ["api", "worker"])
def test_images_install_the_whole_project_from_a_clean_context(target, images):
    instructions = images.chain(target)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied: set[str] = set()
    for instruction in instructions:
        if instruction.keyword == "COPY" and "--from" not in instruction.args:
            *sources, _ = instruction.args.split()
            copied |= {Path(source).as_posix() for source in sources}
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        needed |= {p.name for p in REPO.iterdir()
                   if p.is_dir() and fnmatch.fnmatch(p.name, pattern)
                   and (p / "__init__.py").exists()}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    assert any(i.keyword == "RUN" and re.search(r"\bpip install\b.*\s\.(\s|$)", i.args + " ")
               for i in instructions), "the project is not pip-installed"
    python = SpecifierSet(pyproject["project"]["requires-python"])
    text = " ".join([images.root_image(target)]
                    + [i.args for i in instructions if i.keyword == "RUN"])
    checked = re.findall(r"version_info\[:2\] == \((\d+), (\d+)\)", text)  # in the build
    versions = set(re.findall(r"python:?(3\.\d+)", text)) | {f"{a}.{b}" for a, b in checked}
    assert versions and all(python.contains(f"{v}.0") for v in versions), versions
    for name in dockerfile_env(instructions):
        if name.startswith("REGCL_"):
            assert name in KNOWN_ENV, name


def test_dependencies_come_from_the_runtime_lock_with_nothing_baked_in(images):
    """The dependencies: ``pip install --require-hashes -r`` of requirements/main.txt, in a
    stage of their own that may read a proxy's CA bundle from docker/certs/; the images copy
    its venv alone, so no bundle, index or pip setting reaches them. The project itself installs
    without an index (no deps, the locked build backend). No instruction needs BuildKit."""
    stages = {stage.name: stage for stage in images.stages}
    source = next(i for i in stages[stages["api"].base].instructions
                  if i.keyword == "COPY" and i.args.startswith("--from="))
    deps = stages[source.args.split()[0].removeprefix("--from=")].instructions
    lock = next(i for i in deps if i.keyword == "COPY" and "requirements/" in i.args).args.split()
    assert lock[0] == "requirements/main.txt"
    installs = [i.args for i in deps if i.keyword == "RUN" and "pip install" in i.args]
    assert len(installs) == 1 and re.search(
        rf"pip install --require-hashes -r {re.escape(lock[1])}(\s|$)", installs[0]), installs
    for target in ("api", "worker"):
        chain = images.chain(target)
        runs = [i.args for i in chain if i.keyword == "RUN" and "pip install" in i.args]
        assert runs and all("--no-deps" in run and "--no-build-isolation" in run
                            for run in runs), runs
        env = dockerfile_env(chain)
        assert not {"PIP_CERT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"} & set(env), env
        for instruction in chain:
            if instruction.keyword in ("COPY", "ADD"):
                assert not re.search(r"\.(crt|pem)\b|certs|ca-certificates", instruction.args), (
                    instruction)
    for stage in images.stages:
        for instruction in stage.instructions:
            assert "--mount=" not in instruction.args, f"BuildKit only: {instruction}"
            assert not re.search(r"--(extra-)?index-url|download\.pytorch\.org",
                                 instruction.args), instruction


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_docker_scripts_parse(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_the_check_script_runs_the_cpu_profile_it_can_run_here(services):
    text = (REPO / "scripts" / "docker_check.sh").read_text()
    assert "--profile cpu" in text and "worker-cpu" in text
    assert re.search(r"--target \"?\$target\"?", text) and "docker/Dockerfile" in text
    assert "demo --url" in text
