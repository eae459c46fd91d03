"""Security checks, each a test: admin keys on every mutating route (enumerated from the
running server's OpenAPI, so a new mutating route without auth fails here), refused before the
body is read; keys compared in constant time and never logged; nothing a user sends is ever
unpickled and official checkpoints load with ``weights_only=True``; request size limits;
artifact paths contained in the store; names validated."""

from __future__ import annotations

import ast
import base64
import builtins
import hmac
import logging
import pickle
import re
import socket
import time
from pathlib import Path

import httpx
import pytest
import torch

from infra.artifacts import ArtifactStore
from infra.datasets import validate_dataset_name
from infra.errors import InvalidName
from infra.names import validate_name
from infra.settings import Settings
from regcl.adapters import read_adapter
from regcl.errors import AdapterError, CheckpointError
from regcl.models.build import read_state_dict
from service.api.deps import check_admin
from service.api.errors import UnauthorizedError
from tests.badinput.bad_support import Store
from tests.service.api_support import (
    ADMIN_KEY,
    MAX_UPLOAD_BYTES,
    assert_problem,
    folder_entries,
    make_image,
    make_zip,
    png_bytes,
)

REPO = Path(__file__).resolve().parents[2]
WRONG_KEY = "wrong-key-wrong-key-wrong"
MUTATING = ("post", "put", "patch", "delete")
PUBLIC_MUTATING = {("post", "/v1/images"), ("post", "/v1/segment"),
                   ("post", "/v1/segment/batch"), ("post", "/labelstudio/predict"),
                   ("post", "/labelstudio/setup")}
"""Mutating operations open to anyone by design (they store nothing durable: images live in
the process's bounded image store; Label Studio's /setup stores its extra params only with the
admin key, tests/labelstudio). Every other mutating operation must need an admin key."""


def _admin_operations(client) -> list[tuple[str, str]]:
    """(method, concrete path) of every mutating operation in the served OpenAPI document
    except the public ones; path parameters filled with harmless values."""
    spec = client.get("/openapi.json").json()
    operations = []
    for template, item in spec["paths"].items():
        for method in item:
            if method in MUTATING and (method, template) not in PUBLIC_MUTATING:
                path = re.sub(r"\{number\}", "1", template)
                path = re.sub(r"\{job_id\}", "0123456789abcdef0123456789abcdef", path)
                operations.append((method, re.sub(r"\{[^}]+\}", "some-name", path)))
    return sorted(operations)


def test_every_mutating_route_needs_an_admin_key(anon, store):
    operations = _admin_operations(anon)
    known = {("post", "/v1/adapters"), ("delete", "/v1/adapters/some-name"),
             ("post", "/v1/datasets"), ("post", "/v1/jobs/merge"),
             ("post", "/v1/versions/1/activate")}
    assert known <= set(operations), operations
    with store.unchanged():
        for method, path in operations:
            for headers in ({}, {"Authorization": f"Bearer {WRONG_KEY}"},
                            {"X-API-Key": WRONG_KEY}, {"Authorization": f"Basic {ADMIN_KEY}"},
                            {"Authorization": "Bearer"}, {"X-API-Key": ""}):
                response = anon.request(method.upper(), path, headers=headers, json={})
                assert_problem(response, 401, "unauthorized")
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                assert WRONG_KEY not in response.text and ADMIN_KEY not in response.text


def _raw_request(url: str, method: str, path: str, declared: int, sent: bytes,
                 headers: str = "") -> tuple[int, bytes]:
    """Send a request that declares ``declared`` body bytes but sends only ``sent``; return
    the status and what the server answered (it must answer without the rest)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"{method.upper()} {path} HTTP/1.1\r\nHost: {host}\r\n"
                     f"Content-Type: multipart/form-data; boundary=xyz\r\n{headers}"
                     f"Content-Length: {declared}\r\n\r\n".encode() + sent)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)  # a server waiting for the body times out here (30 s)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer


PART_START = (b'--xyz\r\nContent-Disposition: form-data; name="adapter_model"; '
              b'filename="m.safetensors"\r\n\r\n' + b"\0" * 1024)
"""The start of a well-formed multipart upload (a server that reads it waits for the rest)."""


def test_unauthenticated_uploads_are_refused_before_the_body_is_read(api, anon, store):
    """401 comes back although only the first KiB of a 1.5 MB body was sent: the body is
    neither read nor spooled to disk; nothing is stored. (Without AdminAuthMiddleware the
    server waits for the rest of the body and this test times out after 30 s.)"""
    declared = 1_500_000
    with store.unchanged():
        for method, path in _admin_operations(anon):
            status, answer = _raw_request(api.url, method, path, declared, PART_START)
            assert status == 401, answer
            assert b"application/problem+json" in answer


def test_a_large_unauthenticated_upload_gets_401(api, anon, store):
    big = b"\0" * 1_500_000
    with store.unchanged():
        for path, files in (("/v1/adapters", {"adapter_config": ("c.json", b"{}"),
                                              "adapter_model": ("m.safetensors", big)}),
                            ("/v1/datasets", {"file": ("d.zip", big)})):
            try:
                response = anon.post(path, data={"name": "intruder"}, files=files)
            except Exception as exc:  # the server may close before the client sent it all
                pytest.fail(f"no answer to an unauthenticated upload: {exc!r}")
            assert_problem(response, 401, "unauthorized")
            assert response.headers.get("connection") == "close"


def test_mutations_disabled_without_keys(start_api, redis_server, tmp_path):
    (tmp_path / "nokeys").mkdir()
    server = start_api(redis_server.url, tmp_path / "nokeys", REGCL_ADMIN_KEYS="")
    with server.client(ADMIN_KEY) as client:
        for method, path in _admin_operations(client):
            response = client.request(method.upper(), path, json={})
            assert_problem(response, 403, "mutations-disabled")
        status, answer = _raw_request(server.url, "post", "/v1/adapters", 1_500_000,
                                      PART_START)
        assert status == 403, answer
    server.stop()


@pytest.mark.parametrize("root_path", ["", "/api"])
def test_the_middleware_answers_before_the_app_starts(root_path):
    """In process, before the lifespan has built the runtime (the routes' own dependencies
    would answer 503): 401 can only come from the middleware, also behind a proxy prefix."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", admin_keys=ADMIN_KEY))
    client = TestClient(app, root_path=root_path, raise_server_exceptions=False)
    assert_problem(client.post(f"{root_path}/v1/adapters"), 401, "unauthorized")
    assert_problem(client.delete(f"{root_path}/v1/datasets/x"), 401, "unauthorized")
    assert_problem(client.post(f"{root_path}/v1/jobs/{'0' * 32}/cancel"), 401, "unauthorized")
    assert client.get(f"{root_path}/v1/adapters").status_code == 503  # not gated: app answers
    assert client.post(f"{root_path}/v1/adapters",
                       headers={"X-API-Key": ADMIN_KEY}).status_code == 503


def test_closed_segmentation_refuses_before_the_body(start_api, redis_server, tmp_path):
    """With REGCL_SEGMENT_REQUIRES_KEY, image uploads and segmentation need a key, checked
    before the body is read as for admin routes; with the key they work."""
    (tmp_path / "closed").mkdir()
    server = start_api(redis_server.url, tmp_path / "closed", REGCL_SEGMENT_REQUIRES_KEY="true")
    image = {"file": ("a.png", png_bytes(make_image(0)))}
    with server.client() as anon, server.client(ADMIN_KEY) as admin:
        for path in ("/v1/images", "/v1/segment", "/labelstudio/predict"):
            status, answer = _raw_request(server.url, "post", path, 1_500_000, PART_START)
            assert status == 401, answer
        assert_problem(anon.post("/v1/images", files=image), 401, "unauthorized")
        assert_problem(anon.post("/v1/segment", json={"image_id": "0" * 64, "box": [1, 1, 5, 5]}),
                       401, "unauthorized")
        assert_problem(anon.post("/labelstudio/predict", json={"tasks": [{"id": 1}]}), 401,
                       "unauthorized")
        assert anon.get("/v1/adapters").status_code == 200  # reading stays open
        assert anon.get("/labelstudio/health").status_code == 200
        assert admin.post("/v1/images", files=image).status_code == 201
        with httpx.Client(base_url=server.url, auth=("labelstudio", ADMIN_KEY)) as basic:
            # Label Studio sends the key as basic auth; no prompt: an empty prediction
            answer = basic.post("/labelstudio/predict", json={
                "tasks": [{"id": 1}], "label_config": "<View><Image name='i' value='$i'/>"
                "<BrushLabels name='m' toName='i'/></View>"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["results"][0]["result"] == []
    server.stop()


def test_keys_are_compared_in_constant_time(monkeypatch):
    """Every configured key is compared with hmac.compare_digest, with no early exit, and
    compare_digest alone decides: no ``==``, ``in`` or length check can admit or refuse a key
    before it (with compare_digest answering "no" the right key is refused, answering "yes" a
    wrong key of another length is admitted)."""
    calls = []
    real = hmac.compare_digest
    answer: list[bool | None] = [None]  # None: the real comparison

    def counting(a, b):
        calls.append((a, b))
        return real(a, b) if answer[0] is None else answer[0]

    monkeypatch.setattr("infra.settings.hmac.compare_digest", counting)
    keys = [ADMIN_KEY, "b" * 20, "c" * 20]
    settings = Settings(redis_url="redis://127.0.0.1:1/0", admin_keys=",".join(keys))
    for presented in (ADMIN_KEY, "c" * 20, WRONG_KEY):  # first, last, no key matches
        calls.clear()
        accepted = settings.is_admin_key(presented)
        assert accepted == (presented in keys)
        assert calls == [(presented.encode(), key.encode()) for key in keys], presented
    calls.clear()
    check_admin(settings, ADMIN_KEY)  # the route check goes through the same comparison
    assert len(calls) == len(keys)
    answer[0] = False
    with pytest.raises(UnauthorizedError):
        check_admin(settings, ADMIN_KEY)
    answer[0] = True
    check_admin(settings, "x")  # another length: only compare_digest may look at lengths


def test_keys_never_reach_the_servers_log(api, anon):
    """The server's log shows every request sent here (the access log, query strings
    included: a key-like query parameter is a control that the log does record what was
    sent), and never a key sent in a header."""
    offset = api.log_file.stat().st_size
    sent = 0
    for headers in ({"Authorization": f"Bearer {ADMIN_KEY}"}, {"X-API-Key": ADMIN_KEY},
                    {"Authorization": f"Bearer {WRONG_KEY}"}, {"X-API-Key": WRONG_KEY}):
        anon.delete("/v1/adapters/no-such-adapter", headers=headers)
        anon.post("/v1/jobs/merge", headers=headers, json={"adapters": ["ghost"]})
        anon.post("/v1/images", headers=headers, content=b"x",
                  params={"key": WRONG_KEY})  # a key in the query string is not a key
        sent += 3
    wanted = {"DELETE /v1/adapters/no-such-adapter": 4, "POST /v1/jobs/merge": 4,
              f"POST /v1/images?key={WRONG_KEY}": 4}
    deadline = time.monotonic() + 30
    while True:
        log = api.log_file.read_bytes()[offset:].decode(errors="replace")
        seen = {request: log.count(f'"{request} HTTP/1.1"') for request in wanted}
        if seen == wanted or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert seen == wanted, (seen, log[-3000:])  # all {sent} requests are in the log
    assert sum(seen.values()) == sent
    assert ADMIN_KEY not in log
    assert WRONG_KEY not in log.replace(f"key={WRONG_KEY}", "")


def test_keys_never_logged_in_process_at_debug(redis_server, tmp_path, caplog):
    """The whole app in process with every logger at DEBUG: requests with keys leave no key
    in any log record; the settings' repr hides them too."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path, admin_keys=ADMIN_KEY)
    assert ADMIN_KEY not in repr(settings) and ADMIN_KEY not in str(settings.model_dump())
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(settings)) as client:
        client.delete("/v1/adapters/none", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        client.delete("/v1/adapters/none", headers={"X-API-Key": WRONG_KEY})
        client.post("/v1/jobs/merge", headers={"X-API-Key": ADMIN_KEY}, json={"adapters": []})
    text = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert caplog.records and ADMIN_KEY not in text and WRONG_KEY not in text


class Evil:
    """Unpickling this creates ``marker`` (any code could run instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def test_uploaded_pickles_are_never_unpickled(admin, store, seeded, tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Evil(marker))
    config = (seeded.adapter_dir / "adapter_config.json").read_bytes()
    weights = (seeded.adapter_dir / "adapter_model.safetensors").read_bytes()
    with store.unchanged():
        for field, filename in (("adapter_model", "adapter_model.safetensors"),
                                ("adapter_model", "adapter_model.bin"),
                                ("adapter_model", "adapter_model.pt"),
                                ("regcl_stats", "regcl_stats.safetensors"),
                                ("regcl_stats", "regcl_stats.pkl")):
            files = {"adapter_config": ("adapter_config.json", config),
                     "adapter_model": ("adapter_model.safetensors", weights),
                     field: (filename, evil)}
            response = admin.post("/v1/adapters", data={"name": "evil"}, files=files)
            assert response.status_code == 422, response.text
        archive = make_zip({**folder_entries(), "images/evil.pkl": evil,
                            "images/evil.png": evil})
        response = admin.post("/v1/datasets", data={"name": "evil"},
                              files={"file": ("d.zip", archive)})
        assert response.status_code == 422, response.text
        image = admin.post("/v1/images", json={"image_base64": base64.b64encode(evil).decode()})
        assert image.status_code == 422, image.text
    assert not marker.exists()


def test_library_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "sam_official.pth"
    torch.save({"image_encoder.x": torch.zeros(1), "evil": Evil(marker)}, checkpoint)
    with pytest.raises(CheckpointError):
        read_state_dict(checkpoint)
    assert not marker.exists()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, '
                                                 '"target_modules": ["qkv"]}')
    (adapter / "adapter_model.safetensors").write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(AdapterError):
        read_adapter(adapter)
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"w": Evil(marker)}, adapter / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle"):
        read_adapter(adapter)
    assert not marker.exists()


def test_no_unsafe_deserialisation_in_the_code():
    """Static: no pickle/marshal/shelve loads and every torch.load passes weights_only=True;
    Celery accepts JSON only."""
    offenders = []
    for package in ("regcl", "service", "infra", "workers"):
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                name = ast.unparse(node.func)
                flags = {k.arg: ast.unparse(k.value) for k in node.keywords}
                unsafe = re.fullmatch(r"(c?pickle|marshal|shelve|dill|joblib)\.(loads?|open)|"
                                      r"(pd|pandas)\.read_pickle", name) \
                    or (re.fullmatch(r"(np|numpy)\.load", name)
                        and flags.get("allow_pickle") == "True") \
                    or (name == "torch.load" and flags.get("weights_only") != "True")
                if unsafe:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert not offenders, offenders
    from workers.celery_app import make_celery

    conf = make_celery(Settings(redis_url="redis://127.0.0.1:1/0")).conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert "pickle" not in conf.result_accept_content


def test_request_size_limits_are_413(anon, admin, store):
    too_big = b"\0" * (MAX_UPLOAD_BYTES + 1)
    huge_body = b"\0" * (2 * MAX_UPLOAD_BYTES + 2 * 2**20)  # beyond the whole-request cap
    box = [10.0, 8.0, 90.0, 70.0]
    with store.unchanged():
        assert_problem(anon.post("/v1/images", files={"file": ("big.png", too_big)}), 413,
                       "payload-too-large")
        assert_problem(anon.post("/v1/images", files={"file": ("big.png", huge_body)}), 413,
                       "payload-too-large")
        encoded = base64.b64encode(too_big).decode()
        assert_problem(anon.post("/v1/segment", json={"image_base64": encoded, "box": box}),
                       413, "payload-too-large")
        assert_problem(anon.post("/v1/images", json={"image_base64": encoded}), 413,
                       "payload-too-large")
        assert_problem(admin.post("/v1/datasets", data={"name": "big"},
                                  files={"file": ("d.zip", too_big)}), 413,
                       "payload-too-large")

        def chunks(first: bytes = b""):  # no Content-Length: the limit holds while reading
            yield first
            for _ in range(len(huge_body) // 65536 + 1):
                yield b"x" * 65536

        assert_problem(anon.post("/v1/segment", content=chunks(),
                                 headers={"content-type": "application/json"}),
                       413, "payload-too-large")
        part = (b'--x\r\nContent-Disposition: form-data; name="adapter_model"; '
                b'filename="m.safetensors"\r\n\r\n')
        assert_problem(admin.post("/v1/adapters", content=chunks(part),
                                  headers={"content-type": "multipart/form-data; boundary=x"}),
                       413, "payload-too-large")


def test_client_file_names_never_become_paths(api, admin, store, seeded):
    """A valid adapter whose parts carry traversal file names is stored under its registry
    name with canonical file names, inside the artifact store, and nowhere else."""
    data_dir = Path(api.env["REGCL_DATA_DIR"])
    store.settle()
    before = store.files()
    directory = seeded.adapter_dir
    files = {"adapter_config": ("../../../../tmp/evil.json",
                                (directory / "adapter_config.json").read_bytes()),
             "adapter_model": ("..\\..\\evil.safetensors",
                               (directory / "adapter_model.safetensors").read_bytes()),
             "regcl_stats": ("/etc/evil.safetensors",
                             (directory / "regcl_stats.safetensors").read_bytes())}
    response = admin.post("/v1/adapters", data={"name": "contained"}, files=files)
    assert response.status_code == 201, response.text
    try:
        store.settle()  # the router has copied it into the API's cache (see Store.settle)
        added = sorted(set(store.files()) - set(before))
        # The store's copy, and the API's fetched copy (the domain router reads new adapters'
        # statistics: cache/service/<name>-<digest>/), both under canonical names.
        assert any(p.startswith("artifacts/adapters/contained/") for p in added), added
        assert all(p.startswith(("artifacts/adapters/contained/", "cache/service/contained-"))
                   for p in added), added
        assert {p.rsplit("/", 1)[1] for p in added} <= {
            "adapter_config.json", "adapter_model.safetensors", "regcl_stats.safetensors",
            "regcl_adapter.json", ".regcl-manifest.json"}
        assert not Path("/tmp/evil.json").exists() and not (data_dir.parent / "evil.json").exists()
    finally:
        assert admin.delete("/v1/adapters/contained").status_code == 200
        store.settle()


@pytest.mark.parametrize("path", ["../evil", "adapters/../../evil", "/abs", "a//b", "a/./b", "",
                                  "a/", ".."])
def test_artifact_paths_stay_in_the_store(tmp_path, path):
    """Neither an artifact key nor a file name inside an artifact can leave the store."""
    store = ArtifactStore(tmp_path / "store")
    source = tmp_path / "f.txt"
    source.write_text("x")
    with pytest.raises(InvalidName):
        store.put_files({"f.txt": source}, path)
    with pytest.raises(InvalidName):
        store.put_files({path: source}, "adapters/ok")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "abs").exists()
    assert not store.exists("adapters/ok")


@pytest.mark.parametrize("name", ["../x", "..", ".", "a/b", "a\\b", "/x", "A", "-x", "x" * 65,
                                  "é", "a\x00", "a b", "", "a.b", "live\n"])
def test_names_are_validated(name):
    for validate in (validate_name, validate_dataset_name):
        with pytest.raises(InvalidName):
            validate(name)


def test_store_helper_is_shared(store):
    assert isinstance(store, Store)
