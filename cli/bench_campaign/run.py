"""``regcl bench campaign``: one fresh stack per seed; projects 1..N, one per domain, labelled
in sequence by a simulated annotator through the Label Studio routes.

For each task of a domain's stream the annotator clicks through ``/labelstudio/predict``
(:mod:`.annotator`), then submits the ground truth as the annotation (ANNOTATION_CREATED
webhook). Every ``train_every`` tasks: START_TRAINING, wait for the continual step (and for the
API to serve the live version it leaves), then score ``live`` and ``project`` on the domain's
held-out tasks (a window: a point of the figure). After a domain's last task, every earlier
domain's held-out tasks are scored again (forgetting). ``base`` is static: scored once per
domain. The report (:mod:`.report`) averages over seeds.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

from cli.bench_campaign.annotator import click_session, ls_segmenter
from cli.bench_campaign.arms import DomainData, domain_data, score_arm
from cli.bench_campaign.config import CampaignConfig
from cli.bench_campaign.origin import ImageOrigin
from cli.bench_campaign.payloads import LABEL_CONFIG, annotation_event, train_event
from cli.bench_campaign.report import write_json
from cli.bench_campaign.stack import CampaignStack, campaign_stack
from regcl.client import Client
from regcl.evaluation.clicks import interactive_summary

__all__ = ["run_campaign", "run_seed"]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _setup(admin: httpx.Client, data: DomainData, config: CampaignConfig, seed: int) -> None:
    answer = admin.post("/labelstudio/setup", json={
        "project": f"{data.project}.1712345678", "schema": LABEL_CONFIG,
        "hostname": "http://campaign.local", "access_token": "unused",
        "extra_params": config.step_params(data.domain, seed)})
    answer.raise_for_status()


def _train(admin: httpx.Client, client: Client, project: int, timeout_s: float
           ) -> dict[str, Any]:
    """START_TRAINING; wait for the step and for the API to serve the live version it left."""
    started = time.monotonic()
    answer = admin.post("/labelstudio/webhook", json=train_event(project))
    answer.raise_for_status()
    job = client.wait(answer.json()["job"], timeout_s)
    live = client.live_version().live_version
    if live is not None:
        client.wait_served(live, timeout=300)
    result = job.result or {}
    return {"job": job.id, "state": job.state, "seconds": time.monotonic() - started,
            "activated": result.get("activated"), "live": live,
            "serving": result.get("serving"),
            "annotations": (result.get("snapshot") or {}).get("annotations")}


def _label_stream(data: DomainData, config: CampaignConfig, http: httpx.Client,
                  admin: httpx.Client, client: Client, say: Progress,
                  on_window: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """The annotator labels the stream; training and window scores every train_every."""
    curves, clicks, versions, stored, steps, windows = [], [], [], 0, [], []
    task_seconds = []
    for i, (task_, truth) in enumerate(zip(data.stream, data.stream_truth, strict=True)):
        started = time.monotonic()
        height, width = truth.shape
        session = click_session(ls_segmenter(http, data.project, task_, height, width), truth,
                                stop_iou=config.stop_iou, min_clicks=config.min_clicks)
        answer = admin.post("/labelstudio/webhook", json=annotation_event(
            data.project, task_["id"], task_, truth))
        answer.raise_for_status()
        stored += int(answer.json().get("samples", 0) > 0)
        task_seconds.append(time.monotonic() - started)
        curves.append(session.curve)
        clicks.append(session.clicks)
        versions.append(session.versions[-1] if session.versions else None)
        if (i + 1) % config.train_every == 0:
            step = _train(admin, client, data.project, config.step_timeout_s)
            steps.append({"after_tasks": i + 1, **step})
            say(f"  {data.domain}: {i + 1} tasks, step {step['state']} in "
                f"{step['seconds']:.1f} s (activated {step['activated']}, live {step['live']})")
            windows.append(on_window(i + 1))
    window_noc = []
    for start in range(0, len(curves), config.train_every):
        part = torch.tensor(curves[start:start + config.train_every])
        window_noc.append({"tasks": [start, start + len(part)],
                           **interactive_summary(part, iou_after=(1, 3, 5))})
    return {"tasks": len(curves), "annotations_stored": stored, "clicks": clicks,
            "versions": versions, "stream_windows": window_noc, "steps": steps,
            "windows": windows, "task_seconds": task_seconds}


def run_seed(config: CampaignConfig, seed: int, work_dir: Path, say: Progress = logger.info,
             partial: Path | None = None) -> dict[str, Any]:
    """One seed's campaign on a fresh stack in ``work_dir``; with ``partial``, the seed's
    results so far are written there (JSON) after each domain."""
    started = time.monotonic()
    with ImageOrigin() as origin, campaign_stack(work_dir, origin.url) as stack:
        say(f"seed {seed}: stack up in {time.monotonic() - started:.1f} s at {stack.url}")
        return _campaign(config, seed, stack, origin, say, partial) | {
            "seed": seed, "seconds": time.monotonic() - started}


def _campaign(config: CampaignConfig, seed: int, stack: CampaignStack, origin: ImageOrigin,
              say: Progress, partial: Path | None) -> dict[str, Any]:
    auth = httpx.BasicAuth("labelstudio", stack.admin_key)
    with httpx.Client(base_url=stack.url, timeout=300.0) as http, \
            httpx.Client(base_url=stack.url, timeout=300.0, auth=auth) as admin, \
            Client(stack.url, stack.admin_key, timeout=300.0) as client:
        done: list[DomainData] = []
        domains: dict[str, Any] = {}
        for index, domain in enumerate(config.domains):
            data = domain_data(domain, index + 1, seed, config, origin, client)
            _setup(admin, data, config, seed)
            base = score_arm("base", data, config, http, client)
            say(f"seed {seed} {domain}: base NoC@85 {base['noc@85']:.2f} "
                f"({base['seconds']:.1f} s)")

            def window(tasks: int, data: DomainData = data) -> dict[str, Any]:
                scores = {arm: score_arm(arm, data, config, http, client)
                          for arm in ("live", "project")}
                say(f"  {data.domain} after {tasks} tasks: NoC@85 live "
                    f"{scores['live']['noc@85']:.2f}, project {scores['project']['noc@85']:.2f}"
                    f" ({scores['project']['versions']})")
                return {"tasks": tasks, **scores}

            stream = _label_stream(data, config, http, admin, client, say, window)
            record = http.get(f"/labelstudio/projects/{data.project}")
            record.raise_for_status()
            after = {arm: stream["windows"][-1][arm] for arm in ("live", "project")}
            earlier = {}
            for old in done:  # does learning this project cost the earlier ones?
                earlier[old.domain] = {arm: score_arm(arm, old, config, http, client)
                                       for arm in ("live", "project")}
                say(f"  {old.domain} after {domain}: NoC@85 live "
                    f"{earlier[old.domain]['live']['noc@85']:.2f}, project "
                    f"{earlier[old.domain]['project']['noc@85']:.2f}")
            domains[domain] = {"project": data.project, "base": base, "after": after,
                               "project_record": record.json(), "earlier": earlier, **stream}
            done.append(data)
            if partial is not None:
                write_json({"seed": seed, "config": dataclasses.asdict(config),
                            "domains": domains}, partial)
        return {"domains": domains}


def run_campaign(config: CampaignConfig, work_root: Path | None = None,
                 say: Progress = logger.info, partial_stem: Path | None = None
                 ) -> dict[str, Any]:
    """Every seed in turn; the per-seed results and the report (:func:`.report.summarise`).
    ``partial_stem``: each seed's results so far go to ``<stem>.seed<k>.partial.json``.

    The click rule runs in this process with one torch thread: on small masks torch's
    threads cost more than they give (next_clicks 11 ms with one, 61 ms with two, here)."""
    from cli.bench_campaign.report import summarise

    torch.set_num_threads(1)
    started = time.monotonic()
    seeds = []
    for seed in config.seeds:
        with tempfile.TemporaryDirectory(prefix=f"campaign-{seed}-",
                                         dir=work_root) as tmp:
            partial = (None if partial_stem is None
                       else Path(f"{partial_stem}.seed{seed}.partial.json"))
            seeds.append(run_seed(config, seed, Path(tmp), say, partial))
        say(f"seed {seed} done in {seeds[-1]['seconds']:.0f} s")
    return summarise(config, seeds, elapsed_s=time.monotonic() - started,
                     machine=f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                             f"torch {torch.__version__}")
