"""The data directory's disk fills up (issue #24, case 5): a :class:`Rig` (private
redis-server, a Celery worker) whose data directory - the artifact store, the worker's caches,
the API's upload scratch - is a small tmpfs (the test mounts it; root only), the REAL API
(``python -m service.app``) on it, and the tests' file origin as Label Studio. Seeded while
there is room (an adapter, a dataset, an annotation's sample); then a file fills the disk to the
last byte. During the fault, uploads answer 507 ``insufficient-storage``, a job fails as
``InsufficientStorage`` with nothing registered, an annotation webhook is queued (not lost),
and every stored file, registry entry and listing stays as it was, with nothing half-written
left behind; once the filler is removed, the queued annotation is stored once, uploads succeed
and the same job succeeds."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from infra import keys
from tests.labelstudio.file_origin import TOKEN, FileOrigin
from tests.labelstudio.ls_support import annotation_event, brush_region
from tests.reliability.support import Rig, poll, say
from tests.service.api_support import (
    ADMIN_KEY,
    ApiServer,
    assert_problem,
    folder_entries,
    make_adapter,
    make_image,
    make_zip,
    png_bytes,
    server_env,
)

pytestmark = pytest.mark.slow

DISK_BYTES = 32 * 2**20
PROJECT = 950


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A DISK_BYTES tmpfs mounted at ``tmp_path/rig/data`` (unmounted afterwards)."""
    mount = tmp_path / "rig" / "data"
    mount.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs",
                           str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> int:
    """Write a filler file until the disk refuses (1 MiB, then 4 KiB, then 1-byte writes);
    the bytes written."""
    written = 0
    with open(disk / "filler", "wb", buffering=0) as f:
        for size in (2**20, 4096, 1):
            block = b"\0" * size
            while True:
                try:
                    written += f.write(block) or 0
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return written


def _files(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (the filler excluded)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "filler"}


def _adapter_files(directory: Path, name: str) -> tuple[dict, dict]:
    files = {part: (file, (directory / file).read_bytes(), "application/octet-stream")
             for part, file in (("adapter_config", "adapter_config.json"),
                                ("adapter_model", "adapter_model.safetensors"),
                                ("regcl_stats", "regcl_stats.safetensors"))}
    return {"name": name, "domain": name, "metadata": json.dumps({})}, files


def test_a_full_data_directory_answers_507_and_keeps_what_is_stored(
        small_disk: Path, tmp_path: Path) -> None:
    rig = Rig(tmp_path / "rig")  # its data directory is the tmpfs; its Redis is not on it
    adapter_dir = make_adapter(tmp_path / "adapter", seed=3)
    mask = np.zeros((96, 128), dtype=bool)
    mask[20:60, 30:90] = True
    try:
        with FileOrigin() as origin:
            events = [annotation_event("ANNOTATION_CREATED", PROJECT, 9500 + i, 95000 + i,
                                       origin.add(f"/data/upload/{PROJECT}/{i}.png",
                                                  png_bytes(make_image(60 + i))),
                                       [brush_region(mask)]) for i in range(2)]
            for i, event in enumerate(events):
                event["annotation"]["updated_at"] = f"2026-12-07T12:00:0{i}Z"
            api = ApiServer(server_env(rig.settings.redis_url, small_disk,
                                       REGCL_LABEL_STUDIO_URL=origin.url,
                                       REGCL_LABEL_STUDIO_API_KEY=TOKEN),
                            tmp_path / "api.log")  # the log is not on the small disk
            rig.apis.append(api)
            api.start()
            rig.start_workers("w1")
            with httpx.Client(base_url=api.url, timeout=120,
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
                _run(rig, admin, small_disk, events, adapter_dir)
    finally:
        rig.close()


def _stats_job(rig: Rig, admin: httpx.Client) -> dict:
    """A stats job (its result: a new adapter in the store), run to its end."""
    submitted = admin.post("/v1/jobs/stats", json={"adapter": "seed-adapter",
                                                   "dataset": "seed-data",
                                                   "params": {"output": "new-stats"}})
    assert submitted.status_code == 202, submitted.text
    return admin.get(f"/v1/jobs/{rig.wait(submitted.json()['job']['id']).id}").json()


def _run(rig: Rig, admin: httpx.Client, disk: Path, events: list[dict],
         adapter_dir: Path) -> None:
    redis_client = rig.client
    dataset_zip = make_zip(folder_entries())
    data, files = _adapter_files(adapter_dir, "seed-adapter")
    assert admin.post("/v1/adapters", data=data, files=files).status_code == 201
    assert admin.post("/v1/datasets", data={"name": "seed-data"},
                      files={"file": ("d.zip", dataset_zip, "application/zip")}
                      ).status_code == 201
    first = admin.post("/labelstudio/webhook", json=events[0])
    assert first.json()["status"] == "ok", first.text
    log_key = keys.samples(f"ls-{PROJECT}", "log")
    listings = {p: admin.get(p).json() for p in ("/v1/adapters", "/v1/datasets")}
    stored = _files(disk / "artifacts")
    assert stored and redis_client.llen(log_key) == 1

    filled = _fill(disk)
    answers: Counter[str] = Counter()
    started = time.monotonic()
    for _ in range(3):
        answer = admin.post("/v1/datasets", data={"name": "new-data"},
                            files={"file": ("d.zip", dataset_zip, "application/zip")})
        body = assert_problem(answer, 507, "insufficient-storage")
        assert "no space left" in body["detail"]
        answers["dataset upload: 507"] += 1
        data, files = _adapter_files(adapter_dir, "new-adapter")
        assert_problem(admin.post("/v1/adapters", data=data, files=files), 507,
                       "insufficient-storage")
        answers["adapter upload: 507"] += 1
    queued = admin.post("/labelstudio/webhook", json=events[1])
    assert queued.status_code == 200 and queued.json()["status"] == "queued", queued.text
    answers["annotation webhook: 200 queued"] += 1
    job = _stats_job(rig, admin)
    assert job["state"] == "failed" and job["error"]["type"] == "InsufficientStorage", job
    answers["stats job: failed InsufficientStorage"] += 1
    say(f"the job's error: {job['error']['message']}")
    assert redis_client.xlen(keys.LS_INGEST) == 1  # the consumer met the full disk: kept
    assert redis_client.llen(log_key) == 1
    assert {p: admin.get(p).json() for p in listings} == listings
    assert _files(disk / "artifacts") == stored  # nothing changed, nothing half-written
    assert not list((disk / "tmp" / "uploads").iterdir())
    assert not list((disk / "artifacts" / ".tmp").iterdir())
    assert rig.check_store()["adapters"] == 1
    fault_s = time.monotonic() - started

    (disk / "filler").unlink()
    waited = poll(lambda: redis_client.xlen(keys.LS_INGEST) == 0,
                  "the queued annotation stored", timeout_s=90)
    assert redis_client.llen(log_key) == 2
    again = admin.post("/v1/datasets", data={"name": "new-data"},
                       files={"file": ("d.zip", dataset_zip, "application/zip")})
    assert again.status_code == 201, again.text
    data, files = _adapter_files(adapter_dir, "new-adapter")
    assert admin.post("/v1/adapters", data=data, files=files).status_code == 201
    job_again = _stats_job(rig, admin)
    assert job_again["state"] == "succeeded", job_again
    after = _files(disk / "artifacts")
    assert {k: after[k] for k in stored} == stored
    say(f"disk full ({DISK_BYTES >> 20} MiB tmpfs, filler {filled} bytes) for {fault_s:.1f} s: "
        f"{dict(answers)}; stored files {len(stored)} unchanged (data lost 0), registry and "
        f"listings unchanged, half-written files 0; queued annotation stored {waited:.1f} s "
        f"after the filler was removed (log 2 entries: duplicated 0); then uploads 201 and "
        f"the same stats job succeeded; store check {rig.check_store()}")
