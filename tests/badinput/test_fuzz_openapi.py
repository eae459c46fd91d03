"""Fuzz the HTTP API from its own OpenAPI document with schemathesis and ALL its checks,
against the REAL running server (the shared test server, seeded with a dataset, adapters, a
finished job and an image): no 5xx; every answer's status, content type, headers and body as
documented; schema-valid requests accepted and schema-invalid ones refused; 405 with an
``Allow`` that lists the documented methods; operations that need a key refuse requests
without one and the others answer without one; a resource just created can be read (stateful
links). So a constraint the server enforces but the document does not state fails here, as
does an answer the document does not list.

Content that no schema generator makes at random (image files, adapter weights that fit the
model, dataset archives, mask logits, prompts inside the image) is put into schema-valid
bodies by the hooks of :mod:`tests.badinput.fuzz_hooks`. Bounded and deterministic: a fixed
number of examples per operation in the fuzzing phase and deterministic generation; the
admin run adds the coverage phase (boundary values of every keyword); the anonymous run
checks the same document without a key (fuzzing and stateful phases). The number of requests
the server received and its 5xx answers are counted from its access log.

Operations that take content no schema describes (image bytes, archives, safetensors, XML, a
JSON object inside a string) may answer a documented 422 to a schema-valid request; they are
listed, with the reason, in ``tests/badinput/schemathesis.toml``, and nothing else is exempted.

Longer runs (opt-in; figures in docs/reliability.md): ``REGCL_FUZZ_SEED=<n>`` seeds the
generation (default: deterministic) and ``REGCL_FUZZ_EXAMPLES=<n>`` sets the examples per
operation and phase (default 10), ``REGCL_FUZZ_ONLY="POST /v1/segment,..."`` limits the run to
those operations and ``REGCL_FUZZ_NO_HOOKS=1`` leaves the generated content as it is (the
operations of the configuration then answer their 422s), e.g.
``REGCL_FUZZ_SEED=1 REGCL_FUZZ_EXAMPLES=25 .venv/bin/python -m pytest
tests/badinput/test_fuzz_openapi.py -s``.

Reproduce by hand against any running server (samples as ``write_samples`` makes them)::

    SCHEMATHESIS_HOOKS=tests.badinput.fuzz_hooks REGCL_FUZZ_SAMPLES=/path/to/samples \\
    PYTHONPATH=. st run http://127.0.0.1:8000/openapi.json --checks all -n 25 \\
        --generation-deterministic [-H "Authorization: Bearer $KEY"]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from regcl.models.build import SAM_SPECS
from tests.badinput.fuzz_hooks import SAMPLES_ENV, write_samples
from tests.service.api_support import (
    ADMIN_KEY,
    REPO,
    folder_entries,
    make_image,
    make_zip,
    png_bytes,
)

MAX_EXAMPLES = int(os.environ.get("REGCL_FUZZ_EXAMPLES", "10"))
SEED = os.environ.get("REGCL_FUZZ_SEED")
CONFIG = Path(__file__).with_name("schemathesis.toml")
IMAGE = make_image(0)  # 96 x 128 (H x W)
ACCESS = re.compile(r'"(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS|TRACE) ([^" ]*) HTTP/1\.1" (\d{3})')
PHASES = {"admin": "examples,coverage,fuzzing,stateful", "anonymous": "fuzzing,stateful"}


@pytest.fixture(scope="module")
def fuzz_dir(api, seeded, tmp_path_factory):
    """The schemathesis config (existing ids for path and body parameters, so that part of
    the generated requests reach existing resources instead of 404s) and the hooks' samples.

    Names are not pinned: adapters and datasets share ``{name}``, and the stateful phase
    reads back what it created by following the links."""
    with api.client() as client:
        image = client.post("/v1/images", files={"file": ("a.png", png_bytes(IMAGE))})
    assert image.status_code == 201, image.text
    root = tmp_path_factory.mktemp("fuzz")
    write_samples(root / "samples", image=png_bytes(IMAGE), image_id=image.json()["image_id"],
                  adapter_dir=seeded.adapter_dir, dataset_zip=make_zip(folder_entries()),
                  image_size=IMAGE.shape[:2], mask_side=SAM_SPECS["tiny"].mask_input_side)
    parameters = {"path.job_id": seeded.finished_job, "path.number": 1,
                  "path.image_id": image.json()["image_id"],
                  "body.dataset": seeded.dataset}
    (root / "schemathesis.toml").write_text(
        CONFIG.read_text() + "\n[parameters]\n"
        + "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in parameters.items()))
    return root


def _fuzz(api, fuzz_dir, identity: str) -> tuple[subprocess.CompletedProcess, int, list[str]]:
    """Run schemathesis; returns (its result, requests the server received, its 5xx lines)."""
    offset = api.log_file.stat().st_size
    command = [sys.executable, "-m", "schemathesis.cli",
               "--config-file", str(fuzz_dir / "schemathesis.toml"),
               "run", f"{api.url}/openapi.json", "--checks", "all",
               "--phases", PHASES[identity], "--max-examples", str(MAX_EXAMPLES),
               "--workers", "1", "--continue-on-failure", "--request-timeout", "60",
               "--no-color"]
    command += ["--seed", SEED] if SEED else ["--generation-deterministic"]
    for name in filter(None, os.environ.get("REGCL_FUZZ_ONLY", "").split(",")):
        command += ["--include-name", name]  # e.g. "POST /v1/segment/batch", to reproduce
    if identity == "admin":
        command += ["--header", f"Authorization: Bearer {ADMIN_KEY}"]
    hooks = {} if os.environ.get("REGCL_FUZZ_NO_HOOKS") == "1" else {
        "SCHEMATHESIS_HOOKS": "tests.badinput.fuzz_hooks"}
    env = {**os.environ, **hooks, SAMPLES_ENV: str(fuzz_dir / "samples"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # run in the config's folder: schemathesis keeps its example database in the cwd
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=900 + 60 * MAX_EXAMPLES,
                            cwd=fuzz_dir, env=env)
    log = api.log_file.read_bytes()[offset:].decode(errors="replace")
    statuses = [(m, int(m.group(3))) for m in ACCESS.finditer(log)]
    allowed = _allowed_server_errors()
    return result, len(statuses), [
        m.group(0) for m, status in statuses if status >= 500
        and str(status) not in allowed.get(f"{m.group(1)} {m.group(2).split('?', 1)[0]}", ())]


def _allowed_server_errors() -> dict[str, list[str]]:
    """The 5xx the fuzz configuration allows, by operation ("GET /labelstudio/health": 503):
    what needs Label Studio answers 503 label-studio-not-configured in this run, by design."""
    import tomllib

    return {entry["include-name"]: [s for s in statuses if s.startswith("5")]
            for entry in tomllib.loads(CONFIG.read_text())["operations"]
            if (statuses := entry.get("checks", {}).get("not_a_server_error", {})
                .get("expected-statuses"))}


@pytest.mark.slow
@pytest.mark.parametrize("identity", ["admin", "anonymous"])
def test_openapi_fuzz_with_all_checks(api, fuzz_dir, identity):
    result, sent, errors = _fuzz(api, fuzz_dir, identity)
    output = result.stdout + result.stderr
    summary = re.search(r"(\d+) generated[^\n]*", output)
    phases = re.findall(r"(Coverage|Fuzzing|Stateful) \(in ([0-9.]+s)\)", output)
    print(f"fuzz {identity} (seed {SEED or 'deterministic'}, {MAX_EXAMPLES} examples): {sent} "
          f"received by the server, {len(errors)} 5xx; "
          f"schemathesis: {summary.group(0) if summary else '?'}; "
          f"{', '.join(f'{name} {took}' for name, took in phases)}")
    assert result.returncode == 0, output[-8000:]
    assert sent > (100 if not os.environ.get("REGCL_FUZZ_ONLY") else 0), output[-3000:]
    assert not errors, errors[:20]


def test_the_exempted_operations_exist_and_document_their_422():
    """Each operation the fuzz configuration lets answer 422 to a schema-valid request exists
    and documents that 422 as problem+json; it says why (a comment above it). Each one allowed
    a server error is allowed 503 alone, and documents it."""
    import tomllib

    from infra.settings import Settings
    from service.app import create_app

    document = create_app(Settings(redis_url="redis://127.0.0.1:1/0")).openapi()
    text = CONFIG.read_text()
    exempted = tomllib.loads(text)["operations"]
    assert exempted
    for entry in exempted:
        method, path = entry["include-name"].split(" ", 1)
        operation = document["paths"][path][method.lower()]
        server_errors = entry["checks"].get("not_a_server_error", {}).get("expected-statuses")
        if server_errors is not None:
            assert {s for s in server_errors if s.startswith("5")} == {"503"}, path
            assert "application/problem+json" in operation["responses"]["503"]["content"], path
        if "positive_data_acceptance" in entry["checks"]:
            assert "application/problem+json" in operation["responses"]["422"]["content"], path
            statuses = entry["checks"]["positive_data_acceptance"]["expected-statuses"]
            assert "422" in statuses and not {"400", "413", "415"} & set(statuses), path
        before = text[:text.index(f'include-name = "{entry["include-name"]}"')]
        assert before.rstrip().splitlines()[-1].startswith("# "), f"no reason given: {path}"
