"""Label Studio's predictions: what serves the project, the session's previous mask, the task
image as a pre-encode recorded it, and the pre-encode of what serves (see
:mod:`service.labelstudio.backend`'s module doc, **predict** and **pre-encode**)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import numpy as np
import redis

from infra.jobs import JobRecord
from regcl.errors import RegclError
from service.engine import AUTO, LIVE
from service.engine.decode import SegmentResult
from service.engine.errors import ImageNotFoundError, UnknownAdapterError
from service.labelstudio.annotations import project_id_of
from service.labelstudio.brush_rle import encode_brush_rle
from service.labelstudio.click_memory import ClickMemory
from service.labelstudio.connection import LabelStudioConnection
from service.labelstudio.context import ContextPrompt, parse_context
from service.labelstudio.errors import PreencodeDisabledError
from service.labelstudio.label_config import LabelConfig, parse_label_config
from service.labelstudio.polygons import mask_to_polygons
from service.labelstudio.preencode import ProjectPreencode
from service.labelstudio.schemas import (
    BrushRegion,
    BrushValue,
    PolygonRegion,
    PolygonValue,
    PredictRequest,
    PredictResponse,
    TaskPrediction,
)
from service.labelstudio.serving import Serving, ServingChoice
from service.labelstudio.task_images import TaskImage, TaskImages

__all__ = ["Predictions"]

logger = logging.getLogger(__name__)


class Predictions:
    """``/labelstudio/predict`` and the pre-encode of what serves a project."""

    def __init__(self, runtime: Any, connection: LabelStudioConnection, images: TaskImages,
                 serving: ServingChoice, clicks: ClickMemory,
                 preencoder: ProjectPreencode) -> None:
        self.runtime = runtime  # a backend.ApiRuntime
        self.connection = connection
        self.images = images
        self.serving = serving
        self.clicks = clicks
        self.preencoder = preencoder

    @property
    def model_version(self) -> str:
        """What predictions are made with now: ``base`` or ``live:<n>``."""
        return self.runtime.engine.adapters.live_label

    # -- pre-encode ----------------------------------------------------------------------------

    def preencode(self, project_id: int, adapter: str = LIVE) -> tuple[JobRecord, bool]:
        """Encode the project's tasks without annotations with ``adapter`` (what serves the
        project: ``live``, ``base`` or a domain adapter's name) into the embedding store
        (:mod:`.preencode`). Call it when what serves a project changes: an active job of
        the project with another adapter or version is asked to stop and a new one starts;
        one with the same is answered (second value True). Raises PreencodeAdapterError
        (``auto``), UnknownAdapterError, PreencodeDisabledError, LabelStudioNotConfiguredError."""
        if self.runtime.settings.label_studio_preencode_max_bytes <= 0:
            raise PreencodeDisabledError("REGCL_LABEL_STUDIO_PREENCODE_MAX_BYTES is 0")
        return self.preencoder.start(project_id, adapter)

    def preencode_on_setup(self, project_id: int) -> str | None:
        """The setup's pre-encode with what serves the project (its own adapter, else
        ``live``: what ``auto`` falls back to; the images it routes to a domain adapter are
        encoded at their first click), its job id; None when it is off or could not start
        (logged: a setup never fails for it)."""
        if self.runtime.settings.label_studio_preencode_max_bytes <= 0 or \
                self.connection.origin is None:
            return None
        serving = self.serving.for_project(project_id)
        adapter = serving.adapter if serving.kind == "domain" else LIVE
        try:
            return self.preencode(project_id, adapter)[0].id
        except (RegclError, redis.exceptions.RedisError) as exc:
            logger.warning("project %d: no pre-encode on setup (%s)", project_id, exc)
            return None

    def _follow_serving(self, serving: Serving) -> None:
        """A project pre-encoded before a continual step gave it its own adapter: the first
        predict after the change starts its pre-encode again with that adapter (the job
        record in Redis makes every API process see it started once)."""
        if serving.kind != "domain" or serving.project is None or \
                self.runtime.settings.label_studio_preencode_max_bytes <= 0 or \
                self.connection.origin is None:
            return
        try:
            recorded = self.preencoder.adapter_of(serving.project)
            if recorded is not None and recorded != serving.adapter:
                self.preencode(serving.project, serving.adapter)
        except (RegclError, redis.exceptions.RedisError) as exc:
            logger.warning("project %d: no pre-encode with its adapter %r (%s)",
                           serving.project, serving.adapter, exc)

    # -- predict -------------------------------------------------------------------------------

    def predict(self, body: PredictRequest) -> PredictResponse:
        """One prediction per task, in order (see the module doc)."""
        config = parse_label_config(body.label_config)
        prompt = parse_context(body.params.context if body.params else None)
        serving = self.serving.for_project(None if body.project is None
                                           else project_id_of(body.project))
        self._follow_serving(serving)
        results = []
        for task in body.tasks:
            if prompt is None:
                results.append(TaskPrediction(result=[], model_version=self.model_version))
                continue
            try:
                results.append(self._predict_task(task, config, prompt, serving))
            except RegclError as exc:
                if len(body.tasks) == 1:
                    raise
                logger.warning("task %r: no prediction (%s: %s)", task.get("id"),
                               getattr(exc, "code", type(exc).__name__), exc)
                results.append(TaskPrediction(result=[], model_version=self.model_version))
        return PredictResponse(results=results)

    def _predict_task(self, task: dict[str, Any], config: LabelConfig,
                      prompt: ContextPrompt, serving: Serving) -> TaskPrediction:
        data = task.get("data")
        url = data.get(config.image_key) if isinstance(data, dict) else None
        task_id = task.get("id") if isinstance(task.get("id"), int) else None
        image = self._task_image(url, task_id, serving.project)
        try:
            result = self._segment(image, prompt, serving)
        except ImageNotFoundError:  # evicted since the fetch, or a pre-encode's record whose
            # embedding is not stored for this version: fetch, once more
            image = self.images.get(url, task_id)
            result = self._segment(image, prompt, serving)
        score = float(result.scores[0])  # finite: the engine refuses others
        label = prompt.label or (config.labels[0] if config.labels else "object")
        common = {"from_name": config.from_name, "to_name": config.to_name,
                  "original_width": image.width, "original_height": image.height,
                  "score": score}
        regions: list[BrushRegion | PolygonRegion]
        if config.output == "polygon":
            scale = np.array([100 / image.width, 100 / image.height])
            regions = [PolygonRegion(id=uuid.uuid4().hex[:10], **common, value=PolygonValue(
                points=np.round(xy * scale, 4).tolist(), polygonlabels=[label]))
                for xy in mask_to_polygons(result.masks[0])]
        else:
            regions = [BrushRegion(id=uuid.uuid4().hex[:10], **common, value=BrushValue(
                rle=encode_brush_rle(result.masks[0]), brushlabels=[label]))]
        self.runtime.metrics.segments.labels(serving.kind,
                                             "hit" if result.cache_hit else "miss").inc()
        return TaskPrediction(result=regions, score=score,
                              model_version=self.serving.version_label(result.adapter_version))

    def _segment(self, image: TaskImage, prompt: ContextPrompt, serving: Serving
                 ) -> SegmentResult:
        """One mask for the prompt, with the session's previous mask fed back when this
        click extends a remembered one (:mod:`.click_memory`)."""
        coords, labels, box = prompt.in_pixels(image.width, image.height)
        engine = self.runtime.engine
        session = (serving.project, serving.adapter, image.image_id, prompt)
        previous = self.clicks.previous(*session)
        try:
            result = engine.segment(image.image_id, coords, labels, box, previous, False,
                                    serving.adapter)
        except UnknownAdapterError:  # the project's adapter was deleted: the router serves
            if serving.adapter in (AUTO, LIVE):
                raise
            logger.warning("project %s: its adapter %r is gone; auto serves", serving.project,
                           serving.adapter)
            result = engine.segment(image.image_id, coords, labels, box, previous, False, AUTO)
        self.clicks.remember(*session, result.low_res_logits)
        return result

    def _task_image(self, url: object, task_id: int | None,
                    project_id: int | None) -> TaskImage:
        """The task's image: remembered by this process, else as the project's pre-encode
        recorded it (no fetch: its embedding may be in the store; if not, the encode finds
        no image and the caller fetches), else fetched."""
        key = self.images.key_of(url, task_id)
        known = self.images.remembered(key)
        if known is None and project_id is not None:
            known = self.preencoder.indexed(project_id, key)
        return known if known is not None else self.images.get(url, task_id)
