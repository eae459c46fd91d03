"""Many hosts, nothing shared but Redis and object storage (issue #12, part 2).

The API and two workers run as separate processes, each with its own data directory; they
share only a redis-server and an S3 endpoint (moto's standalone server, the real S3 protocol
over HTTP on localhost, reached through the usual ``AWS_*`` variables). A ``trainer`` consumes
only the GPU queue and a ``merger`` only the merge queue, so the work is split the way a
deployment splits it, and each job records the worker that ran it:

1. a dataset and a ready adapter are uploaded over HTTP (into S3);
2. the trainer trains an adapter while the merger merges the uploaded one (their running
   times overlap: the trainer pauses after training, by fault injection, so the overlap does
   not depend on the machine's speed); the merged version goes live and is served;
3. the merger's next merge is frozen in the middle of uploading its version (a TCP proxy in
   front of S3 stalls the weights' PUT) and the merger is SIGKILLed: nothing of that version
   is visible under ``versions/``, only staged files under ``.tmp/``; a new merger takes the
   job over (the reaper requeues it) and publishes a complete version, which goes live;
4. every artifact in the bucket is complete and matches its manifest's SHA-256 digests, read
   back by this process (a reader on another host), and the registry's digests match;
5. the API is restarted on a fresh data directory and serves the live version from S3, with
   the same masks as before.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.artifacts import MANIFEST, ArtifactInfo, ArtifactStore
from regcl.client import Client
from regcl.data.domains import domain_split
from tests.deploy.stall_proxy import StallProxy
from tests.deploy.support import Deployment, client_of, say, wait_job, wait_served
from tests.reliability.support import poll
from tests.s3_support import MotoS3
from tests.service.api_support import (
    make_adapter,
    make_image,
    png_bytes,
)
from tests.workers.worker_support import JOB_TIMEOUT_S
from workers.celery_app import GPU_QUEUE, MERGE_QUEUE

PREFIX = "deploy"
TRAIN = {"adapter": "trained", "epochs": 1, "rank": 4, "batch_size": 4}
PAUSE_S = 20  # the trainer pauses this long after training (the merge runs meanwhile)
BOX = [10.0, 8.0, 90.0, 70.0]


def _domain_zip(count: int) -> bytes:
    images, masks = domain_split("polyp", "train", count)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(count):
            zf.writestr(f"images/{i}.png",
                        png_bytes(images[i].permute(1, 2, 0).to(torch.uint8).numpy()))
            zf.writestr(f"masks/{i}.png", png_bytes(masks[i].numpy().astype(np.uint8) * 255))
    return buffer.getvalue()


@pytest.fixture
def deployment(tmp_path: Path, moto_s3: MotoS3) -> Iterator[Deployment]:
    """Leases of seconds, so a killed worker's job comes back quickly; the artifact store is
    a new bucket on the S3 endpoint, reached through the ``AWS_*`` variables."""
    bucket = moto_s3.create_bucket(f"regcl-{uuid.uuid4().hex[:12]}")
    stack = Deployment(tmp_path, env=moto_s3.env(), artifact_url=f"{bucket}/{PREFIX}",
                       model="tiny", job_lease_s=3.0, reaper_interval_s=1.0,
                       queued_grace_s=5.0, merge_lock_lease_s=3.0)
    try:
        yield stack
    finally:
        stack.close()


def segment(client: Client, image: np.ndarray) -> tuple[str, np.ndarray]:
    """(adapter version, low-res logits) of a box prompt on the live version."""
    result = client.segment(image, box=BOX, multimask=False, return_logits=True)
    return result.adapter_version, result.masks[0].low_res_logits


def bucket_objects(store: ArtifactStore) -> list[str]:
    """Every object under the store's root, relative to it."""
    root = store._root
    return sorted(p[len(root) + 1:] for p in store.fs.find(root))


def verify_bucket(store: ArtifactStore) -> dict[str, str]:
    """Every artifact under adapters/, versions/ and datasets/ holds exactly the files its
    manifest lists, each with the recorded SHA-256, and the overall digest matches; returns
    artifact key → digest. Read straight from S3, as another host would."""
    groups: dict[str, list[str]] = {}
    for rel in bucket_objects(store):
        kind, name, *rest = rel.split("/")
        if kind in ("adapters", "versions", "datasets"):
            groups.setdefault(f"{kind}/{name}", []).append("/".join(rest))
    digests = {}
    for key, files in groups.items():
        assert MANIFEST in files, f"{key} has files but no manifest: {files}"
        manifest = json.loads(store.fs.cat_file(f"{store._root}/{key}/{MANIFEST}"))
        assert sorted(f for f in files if f != MANIFEST) == sorted(manifest["files"]), key
        for rel, expected in manifest["files"].items():
            data = store.fs.cat_file(f"{store._root}/{key}/{rel}")
            assert hashlib.sha256(data).hexdigest() == expected, f"{key}/{rel}"
        assert ArtifactInfo.digest_of(manifest["files"]) == manifest["sha256"], key
        digests[key] = manifest["sha256"]
    return digests


@pytest.mark.slow
def test_api_and_two_workers_share_only_redis_and_s3(deployment: Deployment) -> None:
    start = time.monotonic()
    s3_port = int(deployment.env["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1])
    proxy = StallProxy(s3_port)
    trainer = deployment.start_worker("trainer", [GPU_QUEUE],
                                      REGCL_FAULT_PAUSE=f"stats:{PAUSE_S}")
    merger = deployment.start_worker("merger", [MERGE_QUEUE], AWS_ENDPOINT_URL_S3=proxy.url)
    api = deployment.start_api()
    image = make_image(7, 96, 128)
    with client_of(api) as client:
        assert client.ready().ready
        # 1. Uploads go to S3.
        assert client.upload_dataset("polyp-data", _domain_zip(6)).count == 6
        client.upload_adapter("uploaded", make_adapter(deployment.root / "uploaded", seed=1))
        base_label, base_logits = segment(client, image)
        assert base_label == "base"

        # 2. Train on one worker while the other merges.
        train = client.submit_train("polyp-data", "polyp", **TRAIN)
        poll(lambda: client.get_job(train).detail.get("phase") == "stats",
             "training to finish its steps", JOB_TIMEOUT_S, 0.2, on_timeout=deployment.logs)
        first = wait_job(deployment, client, client.submit_merge(["uploaded"], activate=True))
        assert client.get_job(train).state == "running"
        train = wait_job(deployment, client, train)
        assert (train.worker, first.worker) == ("trainer@localhost", "merger@localhost")
        times = [train.started_at, first.started_at, first.finished_at, train.finished_at]
        assert times == sorted(times), times  # the merge ran inside the training job
        v1 = first.result["version"]
        wait_served(deployment, client, v1)
        label, live_logits = segment(client, image)
        assert label == f"live:{v1}" and not np.allclose(live_logits, base_logits, atol=1e-4)
        say(f"trainer trained while merger merged: train {train.started_at} → "
            f"{train.finished_at}, merge {first.started_at} → {first.finished_at}")

        # 3. The merger is killed in the middle of uploading the next version.
        # The weights' PUT, wherever the store puts them (staged, or under the version's key).
        proxy.arm(rb"PUT /\S*/(\.tmp/[0-9a-f]{32}|versions/v\d+)/adapter/"
                  rb"adapter_model\.safetensors")
        second = client.submit_merge(["trained"], activate=True)
        poll(proxy.stalled.is_set, "the version upload to stall", JOB_TIMEOUT_S, 0.05,
             on_timeout=deployment.logs)
        merger.kill()
        objects = bucket_objects(deployment.store)
        staged = [o for o in objects if o.startswith(".tmp/")]
        versions = sorted({o.split("/")[1] for o in objects if o.startswith("versions/")})
        assert versions == [f"v{v1}"], objects  # nothing of the killed version is visible
        assert [o.split("/", 2)[2] for o in staged] == ["adapter/adapter_config.json"], staged
        assert client.live_version().live_version == v1
        say(f"merger SIGKILLed while uploading a version ({proxy.matched.decode()}): "
            f"versions/ holds only v{v1}, staged leftovers: {staged}")

        merger2 = deployment.start_worker("merger2", [MERGE_QUEUE])
        second = wait_job(deployment, client, second)
        assert second.worker == f"{merger2.name}@localhost" and second.attempts == 2
        v2 = second.result["version"]
        assert v2 > v1 and second.result["activated"]
        wait_served(deployment, client, v2)
        label, live2_logits = segment(client, image)
        assert label == f"live:{v2}"

        # 4. Every artifact is complete and verified, read back from S3 by another host.
        digests = verify_bucket(deployment.store)
        listed = {f"adapters/{a.name}": a.sha256 for a in client.list_adapters()} \
            | {f"versions/v{v.number}": v.sha256 for v in client.list_versions()} \
            | {"datasets/polyp-data": client.get_dataset("polyp-data").sha256}
        assert listed == digests
        assert [v.number for v in client.list_versions()] == [v1, v2]
        removed = deployment.store.cleanup_temp(older_than_s=0)
        assert removed == 1 and not [o for o in bucket_objects(deployment.store)
                                     if o.startswith(".tmp/")]
    proxy.close()

    # 5. A restarted API (fresh data dir, nothing cached) serves the live version from S3.
    api.stop()
    api2 = deployment.start_api()
    with client_of(api2) as client:
        wait_served(deployment, client, v2)
        label, logits = segment(client, image)
        assert label == f"live:{v2}" and np.array_equal(logits, live2_logits)
    for data_dir in deployment.data_dirs:  # nothing went to a local artifact store
        assert not (data_dir / "artifacts").exists(), data_dir
    assert trainer.process.poll() is None
    say(f"API restarted on a fresh data dir serves live:{v2} from S3; {len(digests)} artifacts "
        f"verified against their manifests; whole test {time.monotonic() - start:.0f} s")
