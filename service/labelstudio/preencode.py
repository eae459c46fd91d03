"""Pre-encoding a Label Studio project, so the first click on a task costs the decoder only:
the job ``labelstudio-preencode``.

The job pages through the project's tasks with Label Studio's API in Label Studio's own task
order (``/api/tasks?project=<id>&page=<n>&fields=task_only``, no ordering of ours; Label
Studio 1.23.2 answers ``{"tasks", "total", ...}``, each task with ``total_annotations`` and
``is_labeled``, and 404 "Invalid page." past the last page), skips the tasks that have
annotations (``total_annotations`` > 0, else ``is_labeled``, else a non-empty
``annotations``), fetches each remaining task's image (:mod:`.task_images`) and has the
engine put its embedding into the embedding store
(:meth:`service.engine.segmentation.SegmentationEngine.persist`,
:mod:`service.engine.embedding_store`: the artifact store, which every API process reads).
It also records the task image's id and size under its URL in Redis
(``keys.ls_preencode_images``), so a first click in any API process knows the image without
fetching it; a predict then takes the embedding from the engine's cache, else the store,
else fetches and encodes (an image changed at its URL since: the old id finds no
embedding of the current version, or the old embedding answers - as the per-process URL
memory of :mod:`.task_images` already does).

- **Adapter**: a parameter of the job (default ``live``, what predictions use); ``base`` or a
  registered domain adapter work too; ``auto`` is refused (it chooses per click, from the
  image's tokens). ``live`` resolves per image, so a job that spans a swap stores the images
  after it under the new version (the store key names the version).
- **Restart**: :meth:`ProjectPreencode.start` on a project whose active job has the same
  adapter and version answers that job; else it asks the older job to stop and starts a new
  one. After a live swap (a listener on the live follower) every project pre-encoded with
  ``live`` is started again; the processes that hear the notice race for the project's lock
  and the later ones find the new job.
- **Byte budget**: ``label_studio_preencode_max_bytes`` (0: no pre-encoding on setup). Every
  embedding of the project's tasks in the store counts (written now or found there); the job
  stops before the image that would take the sum past the budget (all embeddings of a model
  have one size) and says ``stopped: "budget"``.
- **Low priority**: one image at a time on one thread, and before each encode it waits (up
  to :data:`MAX_YIELD_S`) while the engine's encoder has requests queued or running, or a
  prompt was decoded less than :data:`IDLE_S` ago (an annotator clicking). A click that
  arrives while the job's encode runs still shares the CPU with that one encode (the tiny
  model: ~0.1 s; vit_b on 2 CPU cores: ~16 s): an encode cannot be interrupted.
- **A job like the others**: a :class:`infra.jobs.JobStore` record with progress (tasks seen
  of the total), cancellable (``POST /v1/jobs/{id}/cancel`` or ``DELETE
  /labelstudio/preencode/{project}``, checked before each task), its lease renewed while it
  runs on a thread of the API process that started it. A task whose image cannot be had is
  counted and named (``failed``); a refused token or an unreachable Label Studio stops the job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import redis

from infra import keys
from infra.errors import InvalidTransition, NotFound
from infra.jobs import JobRecord, JobStore
from infra.settings import Settings
from regcl.errors import RegclError
from service.engine import AUTO, LIVE, SegmentationEngine
from service.engine.errors import ImageNotFoundError
from service.labelstudio.api_jobs import ApiThreadJobs, count_failure
from service.labelstudio.connection import LabelStudioConnection
from service.labelstudio.errors import (
    LabelStudioNotFoundError,
    LabelStudioUnreachableError,
    PreencodeAdapterError,
    PreencodeDisabledError,
)
from service.labelstudio.label_config import parse_label_config
from service.labelstudio.sync import STOPPING
from service.labelstudio.task_images import TaskImage, TaskImages

__all__ = ["PAGE_SIZE", "PREENCODE_KIND", "ProjectPreencode"]

logger = logging.getLogger(__name__)

PREENCODE_KIND = "labelstudio-preencode"
PAGE_SIZE = 100
MAX_YIELD_S = 30.0
"""Longest a pre-encode waits for a busy encoder before it encodes its image anyway."""
IDLE_S = 0.2
"""A pre-encode starts an encode only when no prompt was decoded for this long."""
YIELD_POLL_S = 0.02
HEADER_BYTES = 2048  # an .npz's own bytes around the features (about 1.1 KiB), at most


def annotated(task: dict[str, Any]) -> bool:
    """Whether a task of Label Studio's list has annotations (see the module doc)."""
    total = task.get("total_annotations")
    if isinstance(total, int):
        return total > 0
    if isinstance(task.get("is_labeled"), bool):
        return bool(task["is_labeled"])
    return bool(task.get("annotations"))


class ProjectPreencode(ApiThreadJobs):
    """Starts, runs and cancels pre-encode jobs (see the module doc) on one thread."""

    what = "pre-encode"
    lost = "the API process that ran this pre-encode stopped"

    def __init__(self, settings: Settings, connection: LabelStudioConnection, jobs: JobStore,
                 client: redis.Redis, images: TaskImages, engine: SegmentationEngine) -> None:
        super().__init__(settings, jobs, client, 1, "ls-preencode")
        self.connection = connection
        self.images = images
        self.engine = engine

    # -- the index the first click reads ------------------------------------------------------

    def indexed(self, project_id: int, key: str) -> TaskImage | None:
        """The image the job recorded for ``key`` (a task image's URL) in the project."""
        try:
            raw = self.redis.hget(keys.ls_preencode_images(project_id), key)
        except redis.exceptions.RedisError:
            return None
        if raw is None:
            return None
        entry = json.loads(raw)
        return TaskImage(entry["image"], int(entry["width"]), int(entry["height"]))

    # -- starting and stopping ----------------------------------------------------------------

    def start(self, project_id: int, adapter: str = LIVE) -> tuple[JobRecord, bool]:
        """The project's pre-encode with ``adapter``: the active job if it has that adapter and
        version (second value True), else a new one (an older job is asked to stop)."""
        if adapter == AUTO:
            raise PreencodeAdapterError("'auto' chooses an adapter per click; pre-encode with "
                                        "'live', 'base' or a domain adapter")
        if self.engine.encoding.store is None:
            raise PreencodeDisabledError("this API process has no embedding store")
        self.connection.require_origin()
        version = self.engine.encode_label(adapter)  # UnknownAdapterError for a bad name
        key = keys.ls_preencode(project_id)
        with self._start_lock, self.redis.lock(f"{key}:lock", timeout=30, blocking_timeout=10,
                                               thread_local=False):
            running = self._active(key)
            if running is not None:
                if running.params.get("adapter") == adapter and \
                        running.params.get("version") == version:
                    return running, True
                with contextlib.suppress(InvalidTransition, NotFound):
                    self.jobs.request_cancel(running.id)
                logger.info("project %d: pre-encode %s replaced (%s -> %s %s)", project_id,
                            running.id, running.params.get("version"), adapter, version)
            job_id = self.jobs.create(PREENCODE_KIND, {"project": project_id,
                                                       "adapter": adapter, "version": version})
            self.redis.hset(key, mapping={"job": job_id, "adapter": adapter,
                                          "version": version})
            self.redis.sadd(keys.LS_PREENCODE_PROJECTS, project_id)
            self._mine.add(job_id)
        self._submit(job_id, project_id, lambda job: self._preencode(job, project_id, adapter))
        logger.info("project %d: pre-encode with %s submitted as job %s", project_id, version,
                    job_id)
        return self.jobs.get(job_id), False

    def status(self, project_id: int) -> JobRecord | None:
        """The project's latest pre-encode job (active or not), or None."""
        raw = self.redis.hget(keys.ls_preencode(project_id), "job")
        if raw is None:
            return None
        try:
            return self.jobs.get(raw.decode() if isinstance(raw, bytes) else raw)
        except NotFound:
            return None

    def cancel(self, project_id: int) -> JobRecord | None:
        """Ask the project's active pre-encode to stop; its record, or None if none is
        active."""
        running = self._active(keys.ls_preencode(project_id))
        if running is None:
            return None
        with contextlib.suppress(InvalidTransition, NotFound):
            return self.jobs.request_cancel(running.id)
        return self.jobs.get(running.id)

    def adapter_of(self, project_id: int) -> str | None:
        """The adapter of the project's latest pre-encode (None: never pre-encoded)."""
        raw = self.redis.hget(keys.ls_preencode(project_id), "adapter")
        return raw.decode() if isinstance(raw, bytes) else raw

    def on_live_swap(self) -> None:
        """Start again every project pre-encoded with ``live`` whose last job encoded another
        version than the one live now (a live-follower listener: it runs after each notice)."""
        try:
            live = self.engine.encode_label(LIVE)
            for project_id in [int(p) for p in self.redis.smembers(keys.LS_PREENCODE_PROJECTS)]:
                adapter, version = (v.decode() if isinstance(v, bytes) else v for v in
                                    self.redis.hmget(keys.ls_preencode(project_id),
                                                     ["adapter", "version"]))
                if adapter == LIVE and version != live:
                    self.start(project_id, LIVE)
        except (RegclError, redis.exceptions.RedisError) as exc:
            logger.warning("pre-encode after a live swap not started: %s", exc)

    # -- running -------------------------------------------------------------------------------

    def _yield(self) -> None:
        """Wait while interactive requests use the encoder or decoded a prompt less than
        IDLE_S ago (at most MAX_YIELD_S)."""
        deadline = time.monotonic() + MAX_YIELD_S
        while time.monotonic() < deadline and (
                self.engine.encoding.busy
                or time.monotonic() - self.engine.last_request < IDLE_S):
            time.sleep(YIELD_POLL_S)

    def _tasks(self, project_id: int, job_id: str) -> Iterator[tuple[dict[str, Any], int]]:
        """The project's tasks in Label Studio's order, each with the list's total."""
        page_no, seen = 1, 0
        while True:
            self._check_stop(job_id)
            try:
                page = self.connection.get_json("/api/tasks", {
                    "project": project_id, "page": page_no, "page_size": PAGE_SIZE,
                    "fields": "task_only", "resolve_uri": "false"})
            except LabelStudioNotFoundError:
                if page_no == 1:
                    raise
                return  # "Invalid page.": past the last one (tasks deleted meanwhile)
            tasks = page.get("tasks") if isinstance(page, dict) else None
            if not isinstance(tasks, list):
                raise LabelStudioUnreachableError("Label Studio's task list has no 'tasks'")
            total = page.get("total") if isinstance(page.get("total"), int) else None
            for task in tasks:
                seen += 1
                yield task, total if total is not None else seen
            if len(tasks) < PAGE_SIZE or (total is not None and seen >= total):
                return
            page_no += 1

    def _preencode(self, job_id: str, project_id: int, adapter: str) -> dict[str, Any]:
        project = self.connection.get_json(f"/api/projects/{project_id}")
        config = parse_label_config(project.get("label_config") if isinstance(project, dict)
                                    else None)
        budget = self.settings.label_studio_preencode_max_bytes
        each = self._embedding_bytes()
        counts = {"tasks": 0, "annotated": 0, "encoded": 0, "written": 0, "stored": 0,
                  "failed": 0}
        used, stopped, versions = 0, None, set()
        seen: set[str] = set()
        failures: list[dict[str, Any]] = []
        index = keys.ls_preencode_images(project_id)
        for task, total in self._tasks(project_id, job_id):
            self._check_stop(job_id)
            counts["tasks"] += 1
            if not isinstance(task, dict):
                raise LabelStudioUnreachableError("Label Studio's task list holds a non-object")
            task_id = task.get("id") if isinstance(task.get("id"), int) else None
            if annotated(task):
                counts["annotated"] += 1
            elif used + each > budget:
                stopped = "budget"
                break
            else:
                try:
                    data = task.get("data")
                    url = data.get(config.image_key) if isinstance(data, dict) else None
                    key = self.images.key_of(url, task_id)
                    self._yield()  # before the fetch too: decoding a PNG holds the GIL
                    image = self.images.remembered(key) or self.indexed(project_id, key) \
                        or self.images.get(url, task_id)
                    try:
                        done = self.engine.persist(image.image_id, adapter)
                    except ImageNotFoundError:  # recorded earlier, not stored for this version
                        image = self.images.get(url, task_id)
                        done = self.engine.persist(image.image_id, adapter)
                except STOPPING:
                    raise
                except RegclError as exc:
                    count_failure(counts, failures, exc, task=task_id)
                else:
                    versions.add(done.adapter_version)
                    counts["encoded"] += int(done.encoded)
                    counts["written"] += int(done.written)
                    if done.nbytes:
                        counts["stored"] += 1
                        self.redis.hset(index, key, json.dumps({
                            "image": image.image_id, "width": image.width,
                            "height": image.height}))
                        if image.image_id not in seen:
                            used += done.nbytes
                            seen.add(image.image_id)
            self.jobs.update_progress(job_id, min(counts["tasks"] / max(total, 1), 1.0),
                                      {**counts, "bytes": used, "total": total})
        return {"project": project_id, "adapter": adapter, "versions": sorted(versions),
                **counts, "bytes": used, "budget": budget, "stopped": stopped,
                "failures": failures}

    def _embedding_bytes(self) -> int:
        """What one embedding takes in the store (C x h x w features and the .npz around
        them): every image of a model has the same."""
        prompt = self.engine.adapters.sam.prompt_encoder
        h, w = prompt.image_embedding_size
        store = self.engine.encoding.store
        itemsize = 2 if store is None else store.dtype.itemsize
        return int(prompt.embed_dim) * int(h) * int(w) * itemsize + HEADER_BYTES
