"""Per-project serving over the real API server (database of tests/labelstudio): a project
whose domain a continual step gave its own adapter is served by that adapter (its
``model_version`` is ``domain:<name>@<sha8>`` and its masks are the adapter's, pixel for
pixel); a project without one is served by auto (here: live, which is base); a later step
whose adapter did not beat live leaves the project on its adapter; a deleted adapter hands
the project back to auto; ``GET /labelstudio/projects[/{id}]`` says all of it.

The record a continual step writes is written here with :class:`ProjectServing`, as the
worker writes it (the worker's side: tests/labelstudio/test_gate_job.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import redis

from infra.project_serving import ProjectServing, ServingCheck
from regcl.client import Client
from service.labelstudio.brush_rle import decode_brush_rle
from tests.labelstudio.file_origin import FileOrigin
from tests.labelstudio.ls_support import keypoint, predict_body, task
from tests.service.api_support import (
    ADMIN_KEY,
    ApiServer,
    assert_problem,
    make_adapter,
    make_image,
    png_bytes,
)

OWN, OTHER = 41, 42


def _predict(client: httpx.Client, project: int, path: str) -> tuple[str, np.ndarray]:
    answer = client.post("/labelstudio/predict", json=predict_body(
        [task(7, path)], [keypoint(40.0, 55.0)], project=project))
    assert answer.status_code == 200, answer.text
    (prediction,) = answer.json()["results"]
    (region,) = prediction["result"]
    return prediction["model_version"], decode_brush_rle(region["value"]["rle"], 96, 128)


def test_a_project_is_served_by_what_its_steps_earned(
        ls_api: ApiServer, ls_anon: httpx.Client, ls_redis: redis.Redis, origin: FileOrigin,
        tmp_path: Path) -> None:
    array = make_image(17)
    data = png_bytes(array)
    path = origin.add("/data/upload/1/served.png", data)
    prompt = {"points": [[51.2, 52.8]], "labels": [1]}
    with Client(ls_api.url, ADMIN_KEY) as admin:
        info = admin.upload_adapter("ls-41-s1", make_adapter(tmp_path / "a", seed=41),
                                    domain="ls-41")
        own = admin.segment(data, multimask=False, adapter="ls-41-s1", **prompt)
        auto = admin.segment(data, multimask=False, adapter="auto", **prompt)
    serving = ProjectServing(ls_redis)
    serving.record("ls-41", ServingCheck("ls-41-s1", info.sha256, 0.74, "base", 0.51, 3,
                                         job_id="step-1"))
    try:
        # the project with its own adapter: that adapter, named with its content's digest
        version, mask = _predict(ls_anon, OWN, path)
        assert version == f"domain:ls-41-s1@{info.sha256[:8]}"
        np.testing.assert_array_equal(mask, own.masks[0].mask)
        # a project without one: auto, which with this router falls back to live (base)
        version, mask = _predict(ls_anon, OTHER, path)
        assert version == auto.adapter_version == "base"
        np.testing.assert_array_equal(mask, auto.masks[0].mask)
        assert not np.array_equal(own.masks[0].mask, auto.masks[0].mask)

        # a later step whose adapter does not beat live changes nothing that serves
        serving.record("ls-41", ServingCheck("ls-41-s2", "0" * 64, 0.40, "base", 0.51, 3,
                                             job_id="step-2"))
        assert _predict(ls_anon, OWN, path)[0] == f"domain:ls-41-s1@{info.sha256[:8]}"
        shown = ls_anon.get(f"/labelstudio/projects/{OWN}")
        assert shown.status_code == 200, shown.text
        body = shown.json()
        assert {k: body[k] for k in ("project", "domain", "serves", "adapter",
                                     "model_version")} == {
            "project": OWN, "domain": "ls-41", "serves": "domain", "adapter": "ls-41-s1",
            "model_version": f"domain:ls-41-s1@{info.sha256[:8]}"}
        assert body["check"]["passed"] and body["check"]["adapter_iou"] == 0.74
        assert body["check"]["job_id"] == "step-1" and body["since"] == body["check"]["at"]
        assert not body["last_check"]["passed"] and body["last_check"]["adapter"] == "ls-41-s2"
        assert "does not beat base" in body["last_check"]["reason"]
        other = ls_anon.get(f"/labelstudio/projects/{OTHER}").json()
        assert (other["serves"], other["adapter"], other["check"], other["since"]) == (
            "auto", "auto", None, None)
        listed = {p["project"]: p["serves"] for p in
                  ls_anon.get("/labelstudio/projects").json()["projects"]}
        assert listed[OWN] == "domain"
        assert_problem(ls_anon.get("/labelstudio/projects/x"), 422, "validation-error")

        # the adapter deleted: auto serves the project again (no failed prediction)
        with Client(ls_api.url, ADMIN_KEY) as admin:
            admin.delete_adapter("ls-41-s1")
        version, mask = _predict(ls_anon, OWN, path)
        assert version == "base"
        np.testing.assert_array_equal(mask, auto.masks[0].mask)
    finally:
        serving.forget("ls-41")
