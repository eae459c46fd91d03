"""``regcl demo``: the whole adaptation loop over HTTP, against a running stack.

    regcl up                          # one terminal (or: docker compose up)
    regcl demo --admin-key <key>      # another one

1. check the stack (``/readyz``);
2. upload a small synthetic dataset of one image domain (``regcl.data.domains``: PNG
   ``images/`` + ``masks/`` pairs in a zip);
3. train a LoRA adapter on it, following its progress (server-sent events of
   ``/v1/jobs/{id}/events``; polling if the stream breaks);
4. fold the adapter into the latest version's merge state (RegCL: RegMean on the Gram
   statistics; the method and rank of that version, so the domains merged so far stay) and
   activate the new version;
5. segment a held-out image of the domain with the base model and with the live adapter, and
   compare: the adapter version each names, IoU with the ground-truth mask, SAM's score.

Nothing but HTTP (httpx) is used: whatever the demo does, any client can do. Every name it
creates is new (``demo-<domain>-<random>``), so it can run again on the same stack; its
version becomes live (the output says how to roll back).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import secrets
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import httpx
import numpy as np
from PIL import Image

__all__ = ["DemoError", "default_base_url", "first_admin_key", "main", "run_demo"]

VERSION_HEADER = "X-Regcl-Adapter-Version"
TERMINAL = ("succeeded", "failed", "cancelled")
REQUEST_TIMEOUT_S = 120.0  # the first segmentation of an image computes its embedding
JOB_TIMEOUT_S = 3600.0
READY_TIMEOUT_S = 120.0
SWAP_TIMEOUT_S = 120.0
POLL_S = 0.5
PROMPT_POINTS = 3
DEFAULT_RANK = 4
STEPS = 5


class DemoError(Exception):
    """A step of the demo failed; the message says what to do about it."""


def default_base_url(environ: Mapping[str, str] = os.environ) -> str:
    """Where ``regcl up`` serves the API: ``REGCL_API_HOST:REGCL_API_PORT`` (a wildcard bind
    address is reached on localhost), default ``http://127.0.0.1:8000``."""
    host = environ.get("REGCL_API_HOST", "").strip()
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    port = environ.get("REGCL_API_PORT", "").strip() or "8000"
    return f"http://{host}:{port}"


def first_admin_key(environ: Mapping[str, str] = os.environ) -> str:
    """The first key of ``REGCL_ADMIN_KEYS`` (comma-separated), or ``""``."""
    keys = (k.strip() for k in environ.get("REGCL_ADMIN_KEYS", "").split(","))
    return next((k for k in keys if k), "")


# -- data --------------------------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _domain_samples(domain: str, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` samples of a synthetic domain: images N x H x W x 3 uint8, masks N x H x W
    bool."""
    import torch

    from regcl.data.domains import domain_split

    images, masks = domain_split(domain, split, count)
    return images.permute(0, 2, 3, 1).to(torch.uint8).numpy(), masks.numpy().astype(bool)


def dataset_zip(domain: str, count: int) -> bytes:
    """``count`` training images of ``domain`` as a zip of ``images/`` + ``masks/`` PNGs."""
    images, masks = _domain_samples(domain, "train", count)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, (image, mask) in enumerate(zip(images, masks)):
            zf.writestr(f"images/{domain}_{i:04d}.png", _png(image))
            zf.writestr(f"masks/{domain}_{i:04d}.png", _png(mask.astype(np.uint8) * 255))
    return buffer.getvalue()


def prompt_points(mask: np.ndarray, count: int = PROMPT_POINTS, seed: int = 0
                  ) -> list[list[float]]:
    """``count`` foreground points ``[x, y]`` drawn (seeded) from the mask's pixels."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise DemoError("the held-out sample has an empty mask")
    picks = np.random.default_rng(seed).choice(xs.size, size=min(count, xs.size), replace=False)
    return [[float(xs[i]), float(ys[i])] for i in sorted(picks)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# -- HTTP --------------------------------------------------------------------------------------


def _problem(response: httpx.Response) -> str:
    """A problem+json body (or any body) as one line."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict) and ("title" in body or "detail" in body):
        return ": ".join(str(body[k]) for k in ("title", "detail") if body.get(k))
    return json.dumps(body)[:300]


class _Api:
    """The stack's HTTP API, with failures turned into :class:`DemoError` messages."""

    def __init__(self, base_url: str, admin_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers,
                                   timeout=REQUEST_TIMEOUT_S)

    def close(self) -> None:
        self.client.close()

    def _unreachable(self, exc: Exception) -> DemoError:
        return DemoError(f"cannot reach the regcl API at {self.base_url} ({exc}). Is the stack "
                         "running? Start it with `regcl up` (or `docker compose up`), or pass "
                         "--url.")

    def send(self, method: str, path: str, expected: tuple[int, ...] = (200,),
             **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._unreachable(exc) from None
        except httpx.TransportError as exc:
            raise DemoError(f"{method} {path} failed: {type(exc).__name__}: {exc}") from None
        if response.status_code not in expected:
            hint = ""
            if response.status_code == 401:
                hint = " (pass the stack's admin key: --admin-key, or REGCL_ADMIN_KEYS)"
            elif response.status_code == 403:
                hint = " (start the stack with REGCL_ADMIN_KEYS set)"
            raise DemoError(f"{method} {path} answered {response.status_code}: "
                            f"{_problem(response)}{hint}")
        return response

    def json(self, method: str, path: str, expected: tuple[int, ...] = (200,),
             **kwargs: Any) -> dict[str, Any]:
        return self.send(method, path, expected, **kwargs).json()

    def events(self, path: str) -> Iterator[dict[str, Any]]:
        """The data of each server-sent event at ``path`` (JSON), until the stream ends."""
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, read=60.0)  # heartbeats come every 15 s
        with self.client.stream("GET", path, timeout=timeout) as response:
            if response.status_code != 200:
                response.read()
                raise DemoError(f"GET {path} answered {response.status_code}: "
                                f"{_problem(response)}")
            data: list[str] = []
            for line in response.iter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif not line and data:
                    yield json.loads("\n".join(data))
                    data = []


# -- the demo ----------------------------------------------------------------------------------


class _Demo:
    def __init__(self, api: _Api, out: IO[str]) -> None:
        self.api = api
        self.out = out
        self._shown: tuple[Any, ...] | None = None

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def step(self, number: int, text: str) -> None:
        self.say(f"[{number}/{STEPS}] {text}")

    def wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT_S
        said = False
        while True:
            response = self.api.send("GET", "/readyz", expected=(200, 503))
            body = response.json()
            if response.status_code == 200:
                return body
            if time.monotonic() > deadline:
                raise DemoError(f"the stack is not ready after {READY_TIMEOUT_S:.0f} s "
                                f"(model loaded: {body.get('model_loaded')}, Redis: "
                                f"{body.get('redis')}); check the `regcl up` output")
            if not said:
                self.say("      waiting for the stack to get ready "
                         f"(model loaded: {body.get('model_loaded')}, "
                         f"Redis: {body.get('redis')})")
                said = True
            time.sleep(1.0)

    def show_progress(self, job: Mapping[str, Any]) -> None:
        """One line per new phase or training step."""
        detail = job.get("detail") or {}
        key = (job.get("state"), detail.get("phase"), detail.get("step"))
        if key == self._shown:
            return
        self._shown = key
        parts = [f"{job.get('state', '?'):<9}", f"{100 * float(job.get('progress', 0)):5.1f}%"]
        if job.get("state") in TERMINAL:
            detail = {}  # the last phase's detail, stale by now
        if detail.get("phase"):
            parts.append(str(detail["phase"]))
        if detail.get("step") is not None:
            parts.append(f"step {detail['step']}/{detail.get('total', '?')}")
        if detail.get("epoch") is not None:
            parts.append(f"epoch {detail['epoch']}")
        for name in ("loss", "iou"):
            if isinstance(detail.get(name), int | float):
                parts.append(f"{name} {detail[name]:.3f}")
        if detail.get("adapter"):
            parts.append(f"adapter {detail['adapter']}")
        self.say("      " + "  ".join(parts))

    def follow(self, job_id: str) -> dict[str, Any]:
        """The job once finished, its progress printed meanwhile; DemoError unless it
        succeeded."""
        self._shown = None
        deadline = time.monotonic() + JOB_TIMEOUT_S
        job: dict[str, Any] | None = None
        try:
            for event in self.api.events(f"/v1/jobs/{job_id}/events"):
                job = event["job"]
                self.show_progress(job)
                if job["state"] in TERMINAL or time.monotonic() > deadline:
                    break
        except (httpx.TransportError, ValueError, KeyError) as exc:  # poll instead
            self.say(f"      (event stream interrupted: {type(exc).__name__}; polling)")
        while job is None or job["state"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise DemoError(f"job {job_id} did not finish within {JOB_TIMEOUT_S:.0f} s; "
                                "is a worker running? (`regcl up` starts one)")
            if job is not None:
                time.sleep(POLL_S)
            job = self.api.json("GET", f"/v1/jobs/{job_id}")
            self.show_progress(job)
        if job["state"] != "succeeded":
            error = job.get("error") or {}
            raise DemoError(f"{job['kind']} job {job_id} {job['state']}: "
                            f"{error.get('type', '')} {error.get('message', '')}".rstrip())
        return job

    def wait_served(self, version: int) -> dict[str, Any]:
        """Wait until the API serves ``version`` (it follows the live pointer)."""
        deadline = time.monotonic() + SWAP_TIMEOUT_S
        while True:
            live = self.api.json("GET", "/v1/versions/live")
            if live.get("served_version") == version:
                return live
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the API does not serve version {version} after {SWAP_TIMEOUT_S:.0f} s "
                    f"(live pointer: {live.get('live_version')}, last swap error: "
                    f"{live.get('last_swap_error')})")
            time.sleep(POLL_S)

    def segment(self, image: bytes, points: list[list[float]], adapter: str
                ) -> dict[str, Any]:
        response = self.api.send("POST", "/v1/segment", json={
            "image_base64": base64.b64encode(image).decode("ascii"), "points": points,
            "labels": [1] * len(points), "multimask": False, "adapter": adapter,
            "format": "png"})
        body = response.json()
        mask = body["masks"][0]
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(mask["png"])))) > 127
        return {"adapter": adapter, "version": body["adapter_version"],
                "header": response.headers.get(VERSION_HEADER), "mask": pixels,
                "score": float(mask["score"]), "area": int(mask["area"])}


def _metric(metrics: Mapping[str, Any], split: str) -> str:
    value = (metrics.get(split) or {}).get("iou")
    return f"{value:.3f}" if isinstance(value, int | float) else "n/a"


@dataclass
class _Merged:
    """What the latest version was merged with: a new adapter is folded into its merge state
    only with the same method and parameters (else the merge starts afresh, without the
    domains merged so far) and the same LoRA layout (rank)."""

    number: int | None = None
    method: str | None = None
    params: dict[str, Any] | None = None
    rank: int | None = None


def _latest_merge(api: _Api) -> _Merged:
    versions = api.json("GET", "/v1/versions")["versions"]
    if not versions:
        return _Merged()
    lineage = versions[-1].get("lineage") or {}
    merged = _Merged(versions[-1]["number"], lineage.get("method"), lineage.get("params"))
    for name in lineage.get("adapters") or {}:
        response = api.send("GET", f"/v1/adapters/{name}", expected=(200, 404))
        if response.status_code == 200:
            rank = (response.json().get("metadata", {}).get("train") or {}).get("rank")
            if isinstance(rank, int):
                merged.rank = rank
                break
    return merged


def _run(demo: _Demo, domain: str, train_images: int, epochs: int, rank: int | None,
         method: str | None) -> None:
    api = demo.api
    started = time.monotonic()
    name = f"demo-{domain.replace('_', '-')}-{secrets.token_hex(3)}"

    demo.step(1, f"checking the stack at {api.base_url}")
    ready = demo.wait_ready()
    before = api.json("GET", "/v1/versions/live")
    demo.say(f"      ready; live version: {ready.get('live_version') or 'none (base model)'}")

    demo.step(2, f"uploading {train_images} synthetic {domain!r} images as dataset {name!r}")
    archive = dataset_zip(domain, train_images)
    uploaded = api.json("POST", "/v1/datasets", expected=(201,),
                        data={"name": name, "metadata": json.dumps(
                            {"domain": domain, "source": "regcl demo"})},
                        files={"file": (f"{name}.zip", archive, "application/zip")})
    demo.say(f"      stored: {uploaded['count']} samples ({uploaded['format']}, "
             f"{len(archive) / 1e6:.1f} MB zip)")

    latest = _latest_merge(api)
    rank = rank or latest.rank or DEFAULT_RANK
    demo.step(3, f"training adapter {name!r} ({epochs} epochs, LoRA rank {rank})")
    job = api.json("POST", "/v1/jobs/train", expected=(202,), json={
        "dataset": name, "domain": domain,
        "params": {"adapter": name, "epochs": epochs, "rank": rank}})["job"]
    demo.say(f"      job {job['id']}")
    trained = demo.follow(job["id"])["result"]
    metrics, samples = trained.get("metrics", {}), trained.get("samples", {})
    demo.say(f"      adapter {trained['adapter']}: held-out IoU {_metric(metrics, 'holdout')} "
             f"(base model {_metric(metrics, 'holdout_base')}) on {samples.get('holdout')} "
             f"images; trained on {samples.get('train')}")

    request: dict[str, Any] = {"adapters": [name], "activate": True}
    if method is None and latest.method is not None:  # continue the latest version's merge
        method, request["params"] = latest.method, latest.params
    if method is not None:
        request["method"] = method
    onto = f"version {latest.number}" if latest.number else "an empty merge state"
    demo.step(4, f"merging {name!r} onto {onto} with {method or 'the default method'} "
                 "and activating the result")
    job = api.json("POST", "/v1/jobs/merge", expected=(202,), json=request)["job"]
    demo.say(f"      job {job['id']}")
    merged = demo.follow(job["id"])["result"]
    version = merged.get("version")
    if version is None or not merged.get("activated"):
        raise DemoError(f"the merge made no version to activate: {merged}")
    lineage = api.json("GET", f"/v1/versions/{version}").get("lineage") or {}
    demo.say(f"      version {version} ({lineage.get('method', '?')}): domains "
             f"{', '.join(merged.get('domains', []))}")
    demo.wait_served(version)

    images, masks = _domain_samples(domain, "test", 1)
    image, truth = images[0], masks[0]
    points = prompt_points(truth)
    demo.step(5, f"segmenting a held-out {domain!r} image (not trained on), "
                 f"{len(points)} foreground points")
    png = _png(image)
    results = [demo.segment(png, points, adapter) for adapter in ("base", "live")]
    demo.say(f"      {'adapter':<8} {'version':<10} {'IoU vs truth':>12} {'score':>7} "
             f"{'area':>9}")
    for r in results:
        r["iou"] = iou(r["mask"], truth)
        demo.say(f"      {r['adapter']:<8} {r['version']:<10} {r['iou']:>12.3f} "
                 f"{r['score']:>7.3f} {r['area']:>6} px")
    base, live = results
    if live["version"] != f"live:{version}" or live["header"] != live["version"]:
        raise DemoError(f"the live adapter answered as {live['version']!r} (header "
                        f"{live['header']!r}), expected 'live:{version}'")
    changed = int(np.logical_xor(base["mask"], live["mask"]).sum())
    demo.say(f"      live now serves version {version} (was "
             f"{before.get('adapter_version', 'base')}): IoU {live['iou'] - base['iou']:+.3f}, "
             f"score {live['score'] - base['score']:+.3f}, {changed} pixels changed")

    demo.say()
    demo.say(f"done in {time.monotonic() - started:.0f} s: dataset and adapter {name!r}, "
             f"version {version} is live.")
    previous = before.get("live_version")
    if previous is not None:
        demo.say(f"roll back with: POST {api.base_url}/v1/versions/{previous}/activate "
                 "(with the admin key)")


def run_demo(base_url: str, admin_key: str, *, domain: str = "polyp", train_images: int = 24,
             epochs: int = 3, rank: int | None = None, method: str | None = None,
             out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Drive upload → train → merge + activate → segment against the stack at ``base_url``.

    Returns 0 on success, 1 when a step fails (the stack unreachable, a job failed, ...), 2 on
    bad arguments; progress goes to ``out`` (stdout), errors to ``err`` (stderr).

    The new adapter is folded into the latest version's merge state, which needs the same
    LoRA rank and merge method (and parameters): ``rank`` and ``method`` default to the
    latest version's (else :data:`DEFAULT_RANK` and the service's default method). An
    explicit other method starts a fresh merge (a version of this domain alone).
    """
    from regcl.data.domains import DOMAINS

    out, err = out or sys.stdout, err or sys.stderr
    problem = None
    if not admin_key:
        problem = ("no admin key: pass --admin-key, or set REGCL_ADMIN_KEYS as for the stack "
                   "(training and merging need one)")
    elif domain not in DOMAINS:
        problem = f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}"
    elif train_images < 2 or epochs < 1 or (rank is not None and rank < 1):
        problem = "need --train-images >= 2, --epochs >= 1 and rank >= 1"
    if problem:
        err.write(f"regcl demo: {problem}\n")
        return 2
    api = _Api(base_url, admin_key)
    try:
        _run(_Demo(api, out), domain, train_images, epochs, rank, method)
    except DemoError as exc:
        err.write(f"regcl demo: {exc}\n")
        return 1
    finally:
        api.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m service.demo``: the same as ``regcl demo``."""
    parser = argparse.ArgumentParser(prog="regcl demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=default_base_url(),
                        help="the API (default: REGCL_API_HOST:REGCL_API_PORT, as `regcl up`)")
    parser.add_argument("--admin-key", default=None,
                        help="an admin key (default: the first of REGCL_ADMIN_KEYS)")
    parser.add_argument("--domain", default="polyp")
    parser.add_argument("--train-images", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=None,
                        help="LoRA rank (default: that of the adapters already merged, else "
                        f"{DEFAULT_RANK})")
    parser.add_argument("--method", default=None,
                        help="merge method, e.g. regcl or regcl_product (default: that of the "
                        "latest version, else the service's default)")
    args = parser.parse_args(argv)
    return run_demo(args.url, args.admin_key or first_admin_key(), domain=args.domain,
                    train_images=args.train_images, epochs=args.epochs, rank=args.rank,
                    method=args.method)


if __name__ == "__main__":
    sys.exit(main())
