"""Fuzz the HTTP API from its own OpenAPI document with schemathesis, against the REAL running
server (the shared test server, seeded with a dataset, adapters, a finished job and an image):
once without a key and once with the admin key. Checks: no 5xx, and every answer's status
code, content type and body conform to the document (so a new undocumented answer fails
here too). Bounded and deterministic: a fixed number of examples per operation and a fixed
seed (about a minute in all on 2 CPU cores); the number of requests the server received and
its 5xx answers are counted from its access log.

Reproduce by hand against any running server::

    st run http://127.0.0.1:8000/openapi.json -c "$CHECKS" -n 25 --seed 4 \\
        --generation-deterministic [-H "Authorization: Bearer $KEY"]

with ``CHECKS`` as below.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.service.api_support import ADMIN_KEY, make_image, png_bytes

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance")
MAX_EXAMPLES = 25
SEED = 4
ACCESS = re.compile(r'"(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) [^"]* HTTP/1\.1" (\d{3})')


@pytest.fixture(scope="module")
def config_file(api, seeded, tmp_path_factory):
    """Realistic values for path and body parameters, so that part of the generated requests
    reach existing resources instead of 404s."""
    with api.client() as client:
        image = client.post("/v1/images", files={"file": ("a.png", png_bytes(make_image(0)))})
    assert image.status_code == 201, image.text
    parameters = {
        "path.name": seeded.adapter,
        "path.job_id": seeded.finished_job,
        "path.number": 1,
        "body.image_id": image.json()["image_id"],
        "body.dataset": seeded.dataset,
    }
    path = tmp_path_factory.mktemp("fuzz") / "schemathesis.toml"
    path.write_text("[parameters]\n" + "".join(f"{json.dumps(k)} = {json.dumps(v)}\n"
                                               for k, v in parameters.items()))
    return path


def _fuzz(api, config_file, key: str | None) -> tuple[int, list[str], str]:
    """Run schemathesis; returns (requests the server received, its 5xx lines, output)."""
    offset = api.log_file.stat().st_size
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config_file),
               "run", f"{api.url}/openapi.json", "--checks", CHECKS,
               "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
               "--generation-deterministic", "--workers", "1", "--continue-on-failure",
               "--request-timeout", "60", "--no-color"]
    if key:
        command += ["--header", f"Authorization: Bearer {key}"]
    # run in the config's folder: schemathesis keeps its example database in the cwd
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            cwd=config_file.parent)
    log = api.log_file.read_bytes()[offset:].decode(errors="replace")
    statuses = [(m.group(0), int(m.group(2))) for m in ACCESS.finditer(log)]
    errors = [line for line, status in statuses if status >= 500]
    output = result.stdout + result.stderr
    assert result.returncode == 0 or errors, output[-6000:]
    return len(statuses), errors, output


@pytest.mark.slow
@pytest.mark.parametrize("identity", ["anonymous", "admin"])
def test_openapi_fuzz_finds_no_server_error(api, config_file, identity):
    sent, errors, output = _fuzz(api, config_file, ADMIN_KEY if identity == "admin" else None)
    summary = re.search(r"(\d+) generated", output)
    print(f"fuzz {identity}: {sent} requests received by the server, {len(errors)} 5xx; "
          f"schemathesis: {summary.group(0) if summary else '?'} test cases")
    assert sent > 100, output[-3000:]
    assert not errors, errors[:20]
