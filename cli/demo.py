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

Nothing but HTTP is used, through the library's client (:class:`regcl.client.Client`):
whatever the demo does, a notebook can do the same way. Every name it creates is new
(``demo-<domain>-<random>``), so it can run again on the same stack; its version becomes live
(the output says how to roll back).
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import sys
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from PIL import Image

from regcl.client import (
    ApiConnectionError,
    Client,
    ForbiddenError,
    Job,
    JobTimeoutError,
    NotFoundError,
    Readiness,
    UnauthorizedError,
    WaitTimeoutError,
)
from regcl.errors import RegclError

__all__ = ["DemoError", "add_arguments", "default_base_url", "first_admin_key", "run",
           "run_demo"]

REQUEST_TIMEOUT_S = 120.0  # the first segmentation of an image computes its embedding
JOB_TIMEOUT_S = 3600.0
READY_TIMEOUT_S = 120.0
SWAP_TIMEOUT_S = 120.0
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


# -- the demo ----------------------------------------------------------------------------------


def _explain(exc: Exception, base_url: str) -> str:
    """A failed request as one line that says what to do about it."""
    if isinstance(exc, ApiConnectionError):
        return (f"cannot reach the regcl API at {base_url} ({exc}). Is the stack running? "
                "Start it with `regcl up` (or `docker compose up`), or pass --url.")
    if isinstance(exc, UnauthorizedError):
        return f"{exc} (pass the stack's admin key: --admin-key, or REGCL_ADMIN_KEYS)"
    if isinstance(exc, ForbiddenError):
        return f"{exc} (start the stack with REGCL_ADMIN_KEYS set)"
    if isinstance(exc, JobTimeoutError):
        return f"{exc}; is a worker running? (`regcl up` starts one)"
    if isinstance(exc, WaitTimeoutError):
        return f"{exc}; check the `regcl up` output"
    return str(exc)


class _Demo:
    def __init__(self, client: Client, out: IO[str]) -> None:
        self.client = client
        self.out = out
        self._shown: tuple[Any, ...] | None = None

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def step(self, number: int, text: str) -> None:
        self.say(f"[{number}/{STEPS}] {text}")

    def wait_ready(self) -> Readiness:
        readiness = self.client.ready()  # ApiConnectionError at once if nothing answers
        if not readiness.ready:
            self.say("      waiting for the stack to get ready "
                     f"(model loaded: {readiness.model_loaded}, Redis: {readiness.redis})")
            readiness = self.client.wait_ready(READY_TIMEOUT_S)
        return readiness

    def show_progress(self, job: Job) -> None:
        """One line per new phase or training step."""
        detail = job.detail
        key = (job.state, detail.get("phase"), detail.get("step"))
        if key == self._shown:
            return
        self._shown = key
        parts = [f"{job.state:<9}", f"{100 * job.progress:5.1f}%"]
        if job.finished:
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

    def follow(self, job: Job) -> Job:
        """The job once succeeded (server-sent events; polling if the stream breaks), its
        progress printed meanwhile; JobFailedError if it did not succeed."""
        self._shown = None
        return self.client.wait(job, JOB_TIMEOUT_S, check=True,
                                on_event=lambda event: self.show_progress(event.job))

    def segment(self, image: np.ndarray, points: list[list[float]], adapter: str
                ) -> dict[str, Any]:
        result = self.client.segment(image, points=points, multimask=False, adapter=adapter)
        mask = result.masks[0]
        return {"adapter": adapter, "version": result.adapter_version, "mask": mask.mask,
                "score": mask.score, "area": mask.area}


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


def _latest_merge(client: Client) -> _Merged:
    versions = client.list_versions()
    if not versions:
        return _Merged()
    lineage = versions[-1].lineage
    merged = _Merged(versions[-1].number, lineage.get("method"), lineage.get("params"))
    for name in lineage.get("adapters") or {}:
        try:
            adapter = client.get_adapter(name)
        except NotFoundError:
            continue
        rank = (adapter.metadata.get("train") or {}).get("rank")
        if isinstance(rank, int):
            merged.rank = rank
            break
    return merged


def _run(demo: _Demo, domain: str, train_images: int, epochs: int, rank: int | None,
         method: str | None) -> None:
    client = demo.client
    started = time.monotonic()
    name = f"demo-{domain.replace('_', '-')}-{secrets.token_hex(3)}"

    demo.step(1, f"checking the stack at {client.url}")
    ready = demo.wait_ready()
    before = client.live_version()
    demo.say(f"      ready; live version: {ready.live_version or 'none (base model)'}")

    demo.step(2, f"uploading {train_images} synthetic {domain!r} images as dataset {name!r}")
    archive = dataset_zip(domain, train_images)
    uploaded = client.upload_dataset(name, archive,
                                     metadata={"domain": domain, "source": "regcl demo"})
    demo.say(f"      stored: {uploaded.count} samples ({uploaded.format}, "
             f"{len(archive) / 1e6:.1f} MB zip)")

    latest = _latest_merge(client)
    rank = rank or latest.rank or DEFAULT_RANK
    demo.step(3, f"training adapter {name!r} ({epochs} epochs, LoRA rank {rank})")
    job = client.submit_train(name, domain, adapter=name, epochs=epochs, rank=rank)
    demo.say(f"      job {job.id}")
    trained = demo.follow(job).result
    metrics, samples = trained.get("metrics", {}), trained.get("samples", {})
    demo.say(f"      adapter {trained['adapter']}: held-out IoU {_metric(metrics, 'holdout')} "
             f"(base model {_metric(metrics, 'holdout_base')}) on {samples.get('holdout')} "
             f"images; trained on {samples.get('train')}")

    params = None
    if method is None and latest.method is not None:  # continue the latest version's merge
        method, params = latest.method, latest.params
    onto = f"version {latest.number}" if latest.number else "an empty merge state"
    demo.step(4, f"merging {name!r} onto {onto} with {method or 'the default method'} "
                 "and activating the result")
    job = client.submit_merge([name], method=method, params=params, activate=True)
    demo.say(f"      job {job.id}")
    merged = demo.follow(job).result
    version = merged.get("version")
    if version is None or not merged.get("activated"):
        raise DemoError(f"the merge made no version to activate: {merged}")
    lineage = client.get_version(version).lineage
    demo.say(f"      version {version} ({lineage.get('method', '?')}): domains "
             f"{', '.join(merged.get('domains', []))}")
    client.wait_served(version, SWAP_TIMEOUT_S)

    images, masks = _domain_samples(domain, "test", 1)
    image, truth = images[0], masks[0]
    points = prompt_points(truth)
    demo.step(5, f"segmenting a held-out {domain!r} image (not trained on), "
                 f"{len(points)} foreground points")
    results = [demo.segment(image, points, adapter) for adapter in ("base", "live")]
    demo.say(f"      {'adapter':<8} {'version':<10} {'IoU vs truth':>12} {'score':>7} "
             f"{'area':>9}")
    for r in results:
        r["iou"] = iou(r["mask"], truth)
        demo.say(f"      {r['adapter']:<8} {r['version']:<10} {r['iou']:>12.3f} "
                 f"{r['score']:>7.3f} {r['area']:>6} px")
    base, live = results
    if live["version"] != f"live:{version}":  # (the client checks the header agrees)
        raise DemoError(f"the live adapter answered as {live['version']!r}, expected "
                        f"'live:{version}'")
    changed = int(np.logical_xor(base["mask"], live["mask"]).sum())
    demo.say(f"      live now serves version {version} (was {before.adapter_version}): "
             f"IoU {live['iou'] - base['iou']:+.3f}, "
             f"score {live['score'] - base['score']:+.3f}, {changed} pixels changed")

    demo.say()
    demo.say(f"done in {time.monotonic() - started:.0f} s: dataset and adapter {name!r}, "
             f"version {version} is live.")
    if before.live_version is not None:
        demo.say(f"roll back with: POST {client.url}/v1/versions/{before.live_version}"
                 "/activate (with the admin key)")


def check_arguments(admin_key: str, domain: str, train_images: int, epochs: int,
                    rank: int | None) -> str | None:
    """What is wrong with the demo's arguments, or None."""
    from regcl.data.domains import DOMAINS

    if not admin_key:
        return ("no admin key: pass --admin-key, or set REGCL_ADMIN_KEYS as for the stack "
                "(training and merging need one)")
    if domain not in DOMAINS:
        return f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}"
    if train_images < 2 or epochs < 1 or (rank is not None and rank < 1):
        return "need --train-images >= 2, --epochs >= 1 and rank >= 1"
    return None


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
    out, err = out or sys.stdout, err or sys.stderr
    problem = check_arguments(admin_key, domain, train_images, epochs, rank)
    if problem:
        err.write(f"regcl demo: {problem}\n")
        return 2
    with Client(base_url, admin_key, timeout=REQUEST_TIMEOUT_S) as client:
        try:
            _run(_Demo(client, out), domain, train_images, epochs, rank, method)
        except (DemoError, RegclError) as exc:
            err.write(f"regcl demo: {_explain(exc, client.url)}\n")
            return 1
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``regcl demo``."""
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


def run(args: argparse.Namespace) -> int:
    """``regcl demo`` with parsed :func:`add_arguments` options."""
    return run_demo(args.url, args.admin_key or first_admin_key(), domain=args.domain,
                    train_images=args.train_images, epochs=args.epochs, rank=args.rank,
                    method=args.method)
