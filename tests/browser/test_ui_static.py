"""The page's files without a browser (these run even where chromium is missing): ``/`` and
``/ui/`` serve them with the right types and a same-origin-only Content-Security-Policy,
every file the page or a module imports exists, and nothing points outside the server.
``static/vendor/`` (onnxruntime-web, from npm by ``make vendor``, git-ignored) is not ours:
its files are only checked to be served with the types a browser needs."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.routers.ui import STATIC_DIR, UI_PREFIX, install_ui


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    install_ui(app)
    with TestClient(app) as client:
        yield client


def test_the_page_and_its_modules_are_served(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy
    assert "script-src 'self' 'wasm-unsafe-eval';" in policy  # onnxruntime-web compiles wasm
    html = page.text
    referenced = re.findall(r'(?:src|href)="(/ui/[^"]+)"', html)
    assert f"{UI_PREFIX}/js/app.js" in referenced and f"{UI_PREFIX}/style.css" in referenced
    for path in referenced:
        response = client.get(path)
        assert response.status_code == 200, path
    script = client.get(f"{UI_PREFIX}/js/app.js")
    assert script.headers["content-type"].split(";")[0] in ("text/javascript",
                                                            "application/javascript")
    assert client.get(f"{UI_PREFIX}/../routers/ui.py").status_code == 404
    assert "/" not in {route.path for route in client.app.routes if getattr(
        route, "include_in_schema", False)}


VENDOR = STATIC_DIR / "vendor"


def test_vendored_onnxruntime_web_is_served_with_browser_types(client):
    files = {p.suffix: p for p in (VENDOR / "onnxruntime-web").glob("ort*")}
    if not files:
        pytest.skip("onnxruntime-web is not vendored (`make vendor`)")
    types = {".mjs": ("text/javascript", "application/javascript"), ".wasm": ("application/wasm",)}
    for suffix, allowed in types.items():
        path = files[suffix].relative_to(STATIC_DIR).as_posix()
        response = client.get(f"{UI_PREFIX}/{path}")
        assert response.status_code == 200, path
        assert response.headers["content-type"].split(";")[0] in allowed, path


def test_every_import_resolves_and_nothing_is_fetched_from_elsewhere():
    files = sorted(p for p in STATIC_DIR.rglob("*") if p.is_file()
                   and VENDOR not in p.parents)
    assert {p.suffix for p in files} <= {".html", ".css", ".js"}
    for path in files:
        text = path.read_text()
        assert not re.search(r"(?:https?:)?//(?!www\.w3\.org/2000/svg)[a-z0-9.-]+\.[a-z]{2,}",
                             text), f"{path.name} refers to another host"
        if path.suffix == ".js":
            for target in re.findall(r'^import .* from "(\./[^"]+)";', text, re.M):
                assert (path.parent / target).is_file(), f"{path.name} imports {target}"
