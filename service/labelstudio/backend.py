"""The Label Studio ML backend: predict, learn from annotations, sync, train.

- **predict**: each task's image is fetched from Label Studio (:mod:`.task_images`: its
  origin, or a listed storage host for cloud URIs) and segmented by the engine with the
  interactive prompt (:mod:`.context`; the session's previous mask fed back when the click
  extends a remembered prompt, :mod:`.click_memory`), with what serves the project
  (:mod:`infra.project_serving`: its own domain adapter once a step earned it, else ``auto``;
  ``live`` for every project when ``label_studio_serving`` is ``live``), one mask
  (``multimask`` off, as ``/v1/segment`` with ``multimask: false``), answered as a brush
  region, or as polygons (:mod:`.polygons`) for a ``PolygonLabels`` config, with the version
  that made it (``model_version``: ``domain:<name>@<sha8>``, ``live:<n>``, ``base``). No
  prompt: an empty result (no guessing). A bad task among several gets an empty result and a
  log line; a single task's problem is the answer.
- **ingest** (ANNOTATION_CREATED / _UPDATED, and each annotation of ANNOTATIONS_CREATED): the
  annotation's masks (:mod:`.annotations`: brushes and polygons), checked against the fetched
  image, go into the project's domain sample set (:class:`infra.sample_sets.SampleSets`) with
  the annotation's update time, so a version stored once is not stored again; **remove**
  (ANNOTATIONS_DELETED) takes them out. Every check of the payload happens before the first
  write. An event is stored while its webhook waits (for ``label_studio_webhook_wait_s`` at
  most) only when nothing else is being stored or queued; else it is checked, recorded in the
  ingest queue (:mod:`.ingest_queue`) and answered ``queued`` at once, and stored in arrival
  order, also when it finds the data directory full or Label Studio unreachable.
- **pre-encode** (on ``/labelstudio/setup``, ``POST /labelstudio/preencode``, and after a
  live swap): the project's tasks without annotations encoded ahead of their first click into
  the embedding store every API process reads (:mod:`.preencode`); :meth:`LabelStudioBackend.
  preencode` is the call for a change of what serves a project. A predict takes the task's
  image as the pre-encode recorded it (no fetch) and its embedding from the engine's cache,
  else the store, else fetches and encodes.
- **sync** (``POST /labelstudio/sync``, or ``"sync": true`` in the extra params): the
  project's existing annotations, paged through Label Studio's API (:mod:`.sync`).
- **train** (START_TRAINING, legacy ``/train``, or ``label_studio_train_every`` new
  annotations): submits the domain's continual step (``workers.continual``), one at a time
  per domain.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

import numpy as np
import redis
from PIL import Image
from redis.lock import Lock

from infra.artifacts import ArtifactStore
from infra.datasets import DatasetRegistry
from infra.errors import InsufficientStorage, StoreUnavailable
from infra.jobs import JobRecord, JobStore
from infra.project_serving import ProjectServing
from infra.sample_sets import ProjectSettings, SampleSets
from infra.settings import Settings
from regcl.errors import RegclError
from service.engine import LIVE, SegmentationEngine
from service.engine.errors import ImageNotFoundError
from service.engine.masks import mask_to_png
from service.labelstudio.annotations import (
    AnnotatedMasks,
    annotated_masks,
    check_id,
    project_id_of,
)
from service.labelstudio.brush_rle import BrushRleError
from service.labelstudio.click_memory import ClickMemory
from service.labelstudio.connection import LabelStudioConnection
from service.labelstudio.errors import (
    InvalidExtraParamsError,
    LabelStudioUnreachableError,
    MalformedPayloadError,
    NotEnoughSamplesError,
)
from service.labelstudio.ingest_queue import IngestConsumer, IngestQueue
from service.labelstudio.label_config import LabelConfig, parse_label_config
from service.labelstudio.predictions import Predictions
from service.labelstudio.preencode import ProjectPreencode
from service.labelstudio.schemas import (
    PredictRequest,
    PredictResponse,
    WebhookResponse,
)
from service.labelstudio.serving import ServingChoice
from service.labelstudio.sync import STOPPING, ProjectSync, StoreOutcome
from service.labelstudio.task_images import TaskImage, TaskImages
from workers.params import ContinualParams, validate

__all__ = ["BULK_ACTIONS", "INGEST_ACTIONS", "LabelStudioBackend", "project_id_of"]

logger = logging.getLogger(__name__)

INGEST_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
BULK_ACTIONS = ("ANNOTATIONS_CREATED",)
MAX_BULK = 1000
EXTRA_KEYS = ("domain", "sync")
"""Extra params that are not continual-step parameters."""
DELETE_ACTIONS = ("ANNOTATIONS_DELETED", "ANNOTATION_DELETED")
TRAIN_ACTION = "START_TRAINING"


class ApiRuntime(Protocol):
    """What the backend uses of the API process's runtime (:class:`service.api.runtime.Runtime`
    is one)."""

    settings: Settings
    engine: SegmentationEngine
    redis: redis.Redis
    store: ArtifactStore
    datasets: DatasetRegistry
    jobs: JobStore
    celery: Any | None
    metrics: Any  # prometheus counters; ``segments`` here


class LabelStudioBackend:
    """Label Studio's ML backend over one API process's runtime (see the module doc)."""

    def __init__(self, runtime: ApiRuntime) -> None:
        self.runtime = runtime
        self.connection = LabelStudioConnection(runtime.settings)
        self.images = TaskImages(runtime.settings, runtime.engine, self.connection)
        self.samples = SampleSets(runtime.redis, runtime.store, runtime.datasets)
        self.clicks = ClickMemory(runtime.settings.label_studio_click_memory_bytes)
        self.serving = ServingChoice(runtime.settings, runtime.engine, self.samples,
                                     ProjectServing(runtime.redis))
        self.sync = ProjectSync(runtime.settings, self.connection, runtime.jobs, runtime.redis,
                                self.samples, self)
        self.preencoder = ProjectPreencode(runtime.settings, self.connection, runtime.jobs,
                                           runtime.redis, self.images, runtime.engine)
        live = getattr(runtime, "live", None)  # the live follower: re-run after a swap
        self._listeners = getattr(live, "listeners", None)
        if self._listeners is not None:
            self._listeners.append(self.preencoder.on_live_swap)
        self.predictions = Predictions(runtime, self.connection, self.images, self.serving,
                                       self.clicks, self.preencoder)
        self.queue = IngestQueue(runtime.redis, lease_s=3 * runtime.settings.
                                 label_studio_fetch_timeout_s + 30)
        self.consumer = IngestConsumer(self.queue, self.handle_recorded, STOPPING,
                                       (LabelStudioUnreachableError,)).start()
        self._inline = ThreadPoolExecutor(2, thread_name_prefix="ls-inline")

    def close(self) -> None:
        self.consumer.stop()
        self._inline.shutdown(wait=True)
        if self._listeners is not None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(self.preencoder.on_live_swap)
        self.preencoder.close()
        self.sync.close()
        self.connection.close()

    @property
    def model_version(self) -> str:
        """What predictions are made with now: ``base`` or ``live:<n>``."""
        return self.runtime.engine.adapters.live_label

    # -- setup ---------------------------------------------------------------------------------

    def project_settings(self, project_id: int) -> ProjectSettings:
        return self.samples.project(project_id)

    def configure(self, project_id: int, extra: dict[str, Any]) -> ProjectSettings:
        """Store a project's extra params: ``domain`` and continual-step parameters
        (ConfigError if they are not valid :class:`ContinualParams`)."""
        step = {k: v for k, v in extra.items() if k not in EXTRA_KEYS}
        validate(ContinualParams, step, "extra params (continual step)")
        if not isinstance(extra.get("sync", False), bool):
            raise InvalidExtraParamsError("extra params: 'sync' must be true or false")
        domain = extra.get("domain")
        return self.samples.configure_project(project_id, domain, step)

    # -- pre-encode and predict (:mod:`.predictions`) ----------------------------------------

    def preencode(self, project_id: int, adapter: str = LIVE) -> tuple[JobRecord, bool]:
        """See :meth:`.predictions.Predictions.preencode`."""
        return self.predictions.preencode(project_id, adapter)

    def preencode_on_setup(self, project_id: int) -> str | None:
        return self.predictions.preencode_on_setup(project_id)

    def predict(self, body: PredictRequest) -> PredictResponse:
        return self.predictions.predict(body)

    # -- webhooks ------------------------------------------------------------------------------

    def ingest(self, action: str, project: dict[str, Any] | None, annotation: object,
               task: object) -> WebhookResponse:
        """Store an annotation's masks in its project's domain (replacing what an earlier
        version of the annotation stored); may start a continual step."""
        project_id = project_id_of(project)
        domain = self.samples.project(project_id).domain
        config = parse_label_config((project or {}).get("label_config"))
        found = annotated_masks(annotation, task, config, self.runtime.settings.max_image_pixels)
        outcome = self._store(project_id, domain, found)
        pending = self.samples.pending(domain)
        job = self._maybe_train(project_id, domain, pending) if outcome.outcome == "stored" \
            else None
        return WebhookResponse(status="ok", action=action, domain=domain, annotations=1,
                               samples=outcome.samples,
                               removed=int(outcome.outcome == "removed"),
                               unchanged=int(outcome.outcome == "unchanged"),
                               pending=pending, job=job)

    def ingest_many(self, action: str, project: dict[str, Any] | None, annotations: object,
                    tasks: object) -> WebhookResponse:
        """ANNOTATIONS_CREATED: each annotation stored as ANNOTATION_CREATED would. All are
        checked before anything is fetched or stored; an annotation whose image cannot be
        had is named in ``failed`` (a sync stores it later) and the others are stored."""
        project_id = project_id_of(project)
        domain = self.samples.project(project_id).domain
        found = self._bulk_masks(action, project, annotations, tasks)
        counts = {"stored": 0, "unchanged": 0, "removed": 0, "empty": 0}
        samples, failed = 0, []
        for masks, _ in found:
            try:
                outcome = self._store(project_id, domain, masks)
            except STOPPING:
                raise  # the token, Label Studio or the setup: every other one would fail too
            except RegclError as exc:
                if len(annotations) == 1:
                    raise
                failed.append({"annotation": masks.annotation, "task": masks.task,
                               "code": getattr(exc, "code", "invalid-data"),
                               "detail": str(exc)[:500]})
                logger.warning("project %d: annotation %d not stored (%s)", project_id,
                               masks.annotation, exc)
                continue
            counts[outcome.outcome] += 1
            samples += outcome.samples
        pending = self.samples.pending(domain)
        job = self._maybe_train(project_id, domain, pending) if counts["stored"] else None
        return WebhookResponse(status="ok", action=action, domain=domain,
                               annotations=len(found), samples=samples,
                               removed=counts["removed"], unchanged=counts["unchanged"],
                               pending=pending, job=job, failed=failed)

    def _bulk_masks(self, action: str, project: dict[str, Any] | None, annotations: object,
                    tasks: object) -> list[tuple[AnnotatedMasks, dict[str, Any]]]:
        """Each annotation of a bulk event with its task, all checked."""
        config = parse_label_config((project or {}).get("label_config"))
        if not isinstance(annotations, list) or not isinstance(tasks, list) \
                or not 0 < len(annotations) <= MAX_BULK:
            raise MalformedPayloadError(f"{action} needs 'annotation' and 'task' lists of 1 to "
                                        f"{MAX_BULK} objects")
        by_id = {t.get("id"): t for t in tasks if isinstance(t, dict)}
        found = []
        for i, annotation in enumerate(annotations):
            task_id = annotation.get("task") if isinstance(annotation, dict) else None
            task = by_id.get(task_id) if isinstance(task_id, int) else None
            if task is None and len(tasks) == len(annotations):
                task = tasks[i]  # Label Studio sends the tasks in the annotations' order
            found.append((annotated_masks(annotation, task, config,
                                          self.runtime.settings.max_image_pixels), task))
        return found

    # -- the ingest queue: inline when idle, else recorded and answered at once ---------------

    def receive(self, action: str, project: dict[str, Any] | None, annotation: object,
                task: object) -> WebhookResponse:
        """ANNOTATION_CREATED / _UPDATED: checked, then stored now (:meth:`ingest`) or
        recorded for the queue's consumer (``status: queued``)."""
        project_id = project_id_of(project)
        domain = self.samples.project(project_id).domain
        config = parse_label_config((project or {}).get("label_config"))
        found = annotated_masks(annotation, task, config, self.runtime.settings.max_image_pixels)
        if found.masks:
            self.images.resolve(found.image_url, found.task)  # a foreign URL: refused now
        event = {"action": action, "project": _project_of(project, project_id),
                 "annotation": annotation, "task": task}
        return self._admit([event], lambda: self.ingest(action, project, annotation, task),
                           WebhookResponse(status="queued", action=action, domain=domain,
                                           annotations=1, samples=len(found.masks)), domain)

    def receive_many(self, action: str, project: dict[str, Any] | None, annotations: object,
                     tasks: object) -> WebhookResponse:
        """ANNOTATIONS_CREATED: all checked, then stored now (:meth:`ingest_many`) or each
        recorded for the queue's consumer."""
        project_id = project_id_of(project)
        domain = self.samples.project(project_id).domain
        found = self._bulk_masks(action, project, annotations, tasks)
        for masks, _ in found:
            if masks.masks:
                self.images.resolve(masks.image_url, masks.task)
        assert isinstance(annotations, list)  # checked by _bulk_masks
        head = _project_of(project, project_id)
        events = [{"action": action, "project": head, "annotation": a, "task": t}
                  for a, (_, t) in zip(annotations, found, strict=True)]
        return self._admit(events, lambda: self.ingest_many(action, project, annotations, tasks),
                           WebhookResponse(status="queued", action=action, domain=domain,
                                           annotations=len(found),
                                           samples=sum(len(m.masks) for m, _ in found)), domain)

    def receive_removal(self, action: str, project: dict[str, Any] | None,
                        annotations: object) -> WebhookResponse:
        """ANNOTATIONS_DELETED: removed now (:meth:`remove`) or, when events are queued,
        recorded behind them (so a queued creation does not bring a deleted one back)."""
        project_id = project_id_of(project)
        domain = self.samples.project(project_id).domain
        ids = _annotation_ids(annotations)
        event = {"action": action, "project": _project_of(project, project_id),
                 "annotations": [{"id": i} for i in ids]}
        return self._admit([event], lambda: self.remove(action, project, annotations),
                           WebhookResponse(status="queued", action=action, domain=domain,
                                           annotations=len(ids)), domain)

    def _admit(self, events: list[dict[str, Any]], inline: Callable[[], WebhookResponse],
               queued: WebhookResponse, domain: str) -> WebhookResponse:
        """``inline()``'s answer when the turn is free, nothing is queued and it is done within
        ``label_studio_webhook_wait_s``; else ``events`` recorded and ``queued`` answered."""
        lock = self.queue.take_turn(wait_s=None)
        if lock is not None and self.queue.backlog() != 0:
            self.queue.give_back(lock)
        elif lock is not None:
            done = self._inline.submit(self._inline_turn, lock, inline)
            try:
                return done.result(timeout=self.runtime.settings.label_studio_webhook_wait_s)
            except FutureTimeout:  # it goes on; recorded too, found stored ('unchanged')
                logger.info("%s: storing an event takes longer than %g s; answered queued",
                            domain, self.runtime.settings.label_studio_webhook_wait_s)
            except (InsufficientStorage, StoreUnavailable, LabelStudioUnreachableError) as exc:
                # no room, the store or Label Studio down or slow: kept until it can be stored
                logger.warning("%s: %s; the event is queued", domain, exc)
        self.queue.push(events)
        return queued.model_copy(update={"pending": self.samples.pending(domain)})

    def _inline_turn(self, lock: Lock, inline: Callable[[], WebhookResponse]
                     ) -> WebhookResponse:
        try:
            return inline()
        finally:
            self.queue.give_back(lock)

    def handle_recorded(self, event: dict[str, Any]) -> None:
        """Store (or remove) one recorded event: what the queue's consumer calls."""
        action, project = event["action"], event["project"]
        if "annotations" in event:
            self.remove(action, project, event["annotations"])
        else:
            self.ingest(action, project, event["annotation"], event["task"])

    def store_annotation(self, project_id: int, domain: str, config: LabelConfig,
                         annotation: object, task: object) -> StoreOutcome:
        """One annotation of a task Label Studio's API lists (the sync)."""
        found = annotated_masks(annotation, task, config, self.runtime.settings.max_image_pixels)
        outcome = self._store(project_id, domain, found)
        return StoreOutcome("empty" if outcome.outcome == "removed" else outcome.outcome,
                            outcome.samples)

    def _store(self, project_id: int, domain: str, found: AnnotatedMasks) -> StoreOutcome:
        """Store ``found`` unless the set holds that version already; an annotation without
        masks removes an older version (``removed``) or stores nothing (``empty``)."""
        if found.version is not None and \
                self.samples.version_of(domain, found.annotation) == found.version:
            return StoreOutcome("unchanged")
        if not found.masks:
            removed = self.samples.remove(domain, found.annotation)
            return StoreOutcome("removed" if removed else "empty")
        image, pixels = self._image_pixels(found.image_url, found.task)
        if found.size != (image.width, image.height):
            raise BrushRleError(f"the masks are {found.size[0]} x {found.size[1]} but the "
                                f"task's image is {image.width} x {image.height}")
        pending = self.samples.put(domain, found.annotation, found.task, image.image_id,
                                   _png(pixels), [mask_to_png(m) for m in found.masks],
                                   version=found.version)
        logger.info("project %d: annotation %d stored in %s (%d masks; %d changes pending)",
                    project_id, found.annotation, domain, len(found.masks), pending)
        return StoreOutcome("stored", len(found.masks))

    def _image_pixels(self, url: object, task_id: int) -> tuple[TaskImage, np.ndarray]:
        for _ in range(2):  # evicted from the engine's store in between: fetch once more
            image = self.images.get(url, task_id)
            pixels = self.runtime.engine.images.peek(image.image_id)
            if pixels is not None:
                return image, pixels
        raise ImageNotFoundError("the image was evicted from the image store while it was "
                                 "being stored; send the webhook again")

    def remove(self, action: str, project: dict[str, Any] | None, annotations: object
               ) -> WebhookResponse:
        """Take deleted annotations out of their project's domain."""
        project_id = project_id_of(project)
        domain = self.samples.project(project_id).domain
        ids = _annotation_ids(annotations)
        removed = sum(self.samples.remove(domain, i) for i in ids)
        return WebhookResponse(status="ok", action=action, domain=domain, removed=removed,
                               pending=self.samples.pending(domain))

    def check_connection(self) -> None:
        """One call to Label Studio with the token (its current user): the token's refusal,
        or Label Studio's absence, as its error."""
        self.connection.get_json("/api/current-user/whoami")

    # -- sync ----------------------------------------------------------------------------------

    def start_sync(self, project_id: int) -> tuple[str, str, bool]:
        """Start the sync of the project's existing annotations (:mod:`.sync`), unless one is
        active. Returns (domain, job id, whether it was already running)."""
        domain = self.samples.project(project_id).domain
        # the project exists and the token is accepted, or the caller hears why not, now
        self.connection.get_json(f"/api/projects/{project_id}")
        record, running = self.sync.start(project_id)
        return domain, record.id, running

    # -- training ------------------------------------------------------------------------------

    def _maybe_train(self, project_id: int, domain: str, pending: int) -> str | None:
        every = self.runtime.settings.label_studio_train_every
        celery = self.runtime.celery
        if not every or pending < every or celery is None:
            return None
        try:
            return self.train(project_id, celery)[1]
        except RegclError as exc:  # the annotation is stored: say, go on
            logger.warning("%s: %d changes pending, but no step was started (%s: %s)",
                           domain, pending, type(exc).__name__, exc)
            return None

    def train(self, project_id: int, celery: Any) -> tuple[str, str, bool]:
        """Submit the continual step of the project's domain to ``celery`` (the app), unless
        one is queued or running. Returns (domain, job id, whether it was already running)."""
        settings = self.samples.project(project_id)
        domain = settings.domain
        tasks = {e.task for e in self.samples.entries(domain).values() if e.masks}
        if len(tasks) < 2:
            raise NotEnoughSamplesError(
                f"domain {domain!r} has masks on {len(tasks)} image(s); training needs at "
                "least 2 (one to train on, one held out to judge the result)")
        from workers.submit import submit_continual  # a deployment may run without workers
        with self.samples.step_lock(domain):
            running = self.samples.step_job(domain)
            if running is not None and not self.runtime.jobs.get(running).finished:
                return domain, running, True
            params = {"tolerance": self.runtime.settings.gate_tolerance, **settings.step}
            job = submit_continual(celery, self.runtime.jobs, domain=domain,
                                   project=project_id, params=params)
            self.samples.set_step_job(domain, job.id)
        logger.info("project %d: continual step of %s submitted as job %s", project_id,
                    domain, job.id)
        return domain, job.id, False


def parse_extra_params(extra: object) -> dict[str, Any]:
    """A connection's extra params: an object, a JSON text of one, or nothing ({})."""
    if extra is None or extra == "":
        return {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise InvalidExtraParamsError(f"extra_params is not JSON: {exc}") from None
    if not isinstance(extra, dict):
        raise InvalidExtraParamsError("extra_params must be a JSON object")
    return extra


def _annotation_ids(annotations: object) -> list[int]:
    if not isinstance(annotations, list) or not annotations or len(annotations) > 10_000:
        raise MalformedPayloadError("'annotations' must be a non-empty list of objects with "
                                    "an id")
    return [check_id(a.get("id") if isinstance(a, dict) else None, "annotations[].id")
            for a in annotations]


def _project_of(project: dict[str, Any] | None, project_id: int) -> dict[str, Any]:
    """What a recorded event keeps of the webhook's project: its id and label config."""
    return {"id": project_id, "label_config": (project or {}).get("label_config")}


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()
