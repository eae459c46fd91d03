"""The Label Studio ML backend: predict, learn from annotations, train.

- **predict**: each task's image is fetched from Label Studio (:mod:`.images`) and segmented
  by the engine with the interactive prompt (:mod:`.prompts`), ``live`` adapter, one mask
  (``multimask`` off, as ``/v1/segment`` with ``multimask: false``), answered as a brush
  region with the version that made it. No prompt: an empty result (no guessing). A bad task
  among several gets an empty result and a log line; a single task's problem is the answer.
- **ingest** (ANNOTATION_CREATED / _UPDATED): the annotation's masks (:mod:`.annotations`),
  checked against the fetched image, go into the project's domain sample set
  (:class:`infra.sample_sets.SampleSets`); **remove** (ANNOTATIONS_DELETED) takes them out.
  Every check happens before the first write.
- **train** (START_TRAINING, legacy ``/train``, or ``label_studio_train_every`` new
  annotations): submits the domain's continual step (``workers.continual``), one at a time
  per domain.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from typing import Any, Protocol

import numpy as np
import redis
from PIL import Image

from infra.artifacts import ArtifactStore
from infra.datasets import DatasetRegistry
from infra.jobs import JobStore
from infra.sample_sets import ProjectSettings, SampleSets
from infra.settings import Settings
from regcl.errors import RegclError
from service.engine import LIVE, SegmentationEngine
from service.engine.errors import ImageNotFoundError
from service.engine.masks import mask_to_png
from service.labelstudio.annotations import annotated_masks, check_id
from service.labelstudio.brush_rle import BrushRleError, encode_brush_rle
from service.labelstudio.context import ContextPrompt, parse_context
from service.labelstudio.errors import (
    InvalidExtraParamsError,
    MalformedPayloadError,
    NotEnoughSamplesError,
)
from service.labelstudio.label_config import LabelConfig, parse_label_config
from service.labelstudio.schemas import (
    BrushRegion,
    BrushValue,
    PredictRequest,
    PredictResponse,
    TaskPrediction,
    WebhookResponse,
)
from service.labelstudio.task_images import TaskImage, TaskImages
from workers.params import ContinualParams, validate

__all__ = ["INGEST_ACTIONS", "LabelStudioBackend", "project_id_of"]

logger = logging.getLogger(__name__)

INGEST_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_ACTIONS = ("ANNOTATIONS_DELETED", "ANNOTATION_DELETED")
TRAIN_ACTION = "START_TRAINING"


def project_id_of(project: object) -> int:
    """A project id from ``"<id>.<timestamp>"`` (what /setup, /predict and /train carry),
    an int, or a webhook's ``project`` object."""
    if project is None:
        raise MalformedPayloadError("the request names no project")
    if isinstance(project, dict):
        project = project.get("id")
    if isinstance(project, str):
        head = project.split(".", 1)[0]
        project = int(head) if head.isdigit() and len(head) < 19 else project
    return check_id(project, "project id")


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
        self.images = TaskImages(runtime.settings, runtime.engine)
        self.samples = SampleSets(runtime.redis, runtime.store, runtime.datasets)

    def close(self) -> None:
        self.images.close()

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
        step = {k: v for k, v in extra.items() if k != "domain"}
        validate(ContinualParams, step, "extra params (continual step)")
        domain = extra.get("domain")
        return self.samples.configure_project(project_id, domain, step)

    # -- predict -------------------------------------------------------------------------------

    def predict(self, body: PredictRequest) -> PredictResponse:
        """One prediction per task, in order (see the module doc)."""
        config = parse_label_config(body.label_config)
        prompt = parse_context(body.params.context if body.params else None)
        results = []
        for task in body.tasks:
            if prompt is None:
                results.append(TaskPrediction(result=[], model_version=self.model_version))
                continue
            try:
                results.append(self._predict_task(task, config, prompt))
            except RegclError as exc:
                if len(body.tasks) == 1:
                    raise
                logger.warning("task %r: no prediction (%s: %s)", task.get("id"),
                               getattr(exc, "code", type(exc).__name__), exc)
                results.append(TaskPrediction(result=[], model_version=self.model_version))
        return PredictResponse(results=results)

    def _predict_task(self, task: dict[str, Any], config: LabelConfig,
                      prompt: ContextPrompt) -> TaskPrediction:
        data = task.get("data")
        url = data.get(config.image_key) if isinstance(data, dict) else None
        image = self.images.get(url)
        coords, labels, box = prompt.in_pixels(image.width, image.height)
        try:
            result = self.runtime.engine.segment(image.image_id, coords, labels, box, None,
                                                 False, LIVE)
        except ImageNotFoundError:  # evicted between the fetch and the encode: once more
            image = self.images.get(url)
            result = self.runtime.engine.segment(image.image_id, coords, labels, box, None,
                                                 False, LIVE)
        score = float(result.scores[0])  # finite: the engine refuses others
        label = prompt.label or (config.labels[0] if config.labels else "object")
        region = BrushRegion(
            id=uuid.uuid4().hex[:10], from_name=config.from_name, to_name=config.to_name,
            original_width=image.width, original_height=image.height, score=score,
            value=BrushValue(rle=encode_brush_rle(result.masks[0]), brushlabels=[label]))
        self.runtime.metrics.segments.labels(LIVE, "hit" if result.cache_hit else "miss").inc()
        return TaskPrediction(result=[region], score=score,
                              model_version=result.adapter_version)

    # -- webhooks ------------------------------------------------------------------------------

    def ingest(self, action: str, project: dict[str, Any] | None, annotation: object,
               task: object) -> WebhookResponse:
        """Store an annotation's masks in its project's domain (replacing what an earlier
        version of the annotation stored); may start a continual step."""
        project_id = project_id_of(project)
        domain = self.samples.project(project_id).domain
        config = parse_label_config((project or {}).get("label_config"))
        found = annotated_masks(annotation, task, config, self.runtime.settings.max_image_pixels)
        if not found.masks:
            removed = int(self.samples.remove(domain, found.annotation))
            return WebhookResponse(status="ok", action=action, domain=domain, removed=removed,
                                   pending=self.samples.pending(domain))
        image, pixels = self._image_pixels(found.image_url)
        if found.size != (image.width, image.height):
            raise BrushRleError(f"the masks are {found.size[0]} x {found.size[1]} but the "
                                f"task's image is {image.width} x {image.height}")
        pending = self.samples.put(domain, found.annotation, found.task, image.image_id,
                                   _png(pixels), [mask_to_png(m) for m in found.masks])
        logger.info("project %d: annotation %d stored in %s (%d masks; %d changes pending)",
                    project_id, found.annotation, domain, len(found.masks), pending)
        job = self._maybe_train(project_id, domain, pending)
        return WebhookResponse(status="ok", action=action, domain=domain,
                               samples=len(found.masks), pending=pending, job=job)

    def _image_pixels(self, url: object) -> tuple[TaskImage, np.ndarray]:
        for _ in range(2):  # evicted from the engine's store in between: fetch once more
            image = self.images.get(url)
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
        if not isinstance(annotations, list) or not annotations or len(annotations) > 10_000:
            raise MalformedPayloadError("'annotations' must be a non-empty list of objects with "
                                        "an id")
        ids = [check_id(a.get("id") if isinstance(a, dict) else None, "annotations[].id")
               for a in annotations]
        removed = sum(self.samples.remove(domain, i) for i in ids)
        return WebhookResponse(status="ok", action=action, domain=domain, removed=removed,
                               pending=self.samples.pending(domain))

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


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()
