"""Requests and responses of the Label Studio ML backend routes (``/labelstudio``).

The shapes are Label Studio's (``label_studio/ml/api_connector.py`` sends them, and
``label_studio_ml/api.py`` of label-studio-ml-backend answers them). Requests carry many
fields regcl does not use (``extra="allow"``); the parts it uses are checked by
:mod:`service.labelstudio` with typed problems (``unsupported-result-type``,
``invalid-region``, ``invalid-brush-rle``, ...), not only by these schemas.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BrushRegion",
    "BrushValue",
    "HealthResponse",
    "PredictParams",
    "PredictRequest",
    "PredictResponse",
    "SetupRequest",
    "SetupResponse",
    "TaskPrediction",
    "TrainRequest",
    "TrainResponse",
    "WebhookRequest",
    "WebhookResponse",
]

_OPEN = ConfigDict(extra="allow")
MAX_TASKS = 64
MAX_CONFIG = 256 * 1024
PROJECT_PATTERN = r"^[0-9]{1,18}(\..*)?$"
"""A project as Label Studio names it: ``<id>`` or ``<id>.<created timestamp>``."""


class HealthResponse(BaseModel):
    """``status`` is always ``UP`` when the service answers; ``model_version`` is the version
    predictions are made with now (``base`` or ``live:<n>``)."""

    status: Literal["UP"] = "UP"
    model_class: str = "regcl"
    model_version: str


class SetupRequest(BaseModel):
    """What Label Studio sends when it connects a project (``project`` is ``<id>.<created
    timestamp>``). ``extra_params`` (the connection's "Extra params", a JSON object): ``domain``
    (the project's domain name, default ``ls-<id>``) plus any continual-step parameter
    (``train``, ``holdout``, ``seed``, ``tolerance``, ...); storing them needs the admin key.
    ``access_token`` is accepted and ignored (never stored or logged)."""

    model_config = _OPEN

    project: str = Field(max_length=64, pattern=PROJECT_PATTERN)
    schema_: str | None = Field(default=None, alias="schema", max_length=MAX_CONFIG)
    hostname: str | None = Field(default=None, max_length=2048)
    extra_params: dict[str, Any] | str | None = None


class SetupResponse(BaseModel):
    model_version: str
    domain: str = Field(description="The domain this project's annotations train.")


class PredictParams(BaseModel):
    """``context``: the interactive prompt (``{"result": [regions]}``), absent for batch
    predictions. ``login`` / ``password`` (task data credentials) are ignored."""

    model_config = _OPEN

    context: dict[str, Any] | None = None


class PredictRequest(BaseModel):
    """Tasks to segment (Label Studio sends one for an interactive prediction) with the
    project's labeling config and, for interactive predictions, the prompt."""

    model_config = _OPEN

    tasks: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_TASKS)
    label_config: str = Field(min_length=1, max_length=MAX_CONFIG,
                              description="The project's labeling config (XML with a "
                              "BrushLabels tag on an Image).")
    project: str | None = Field(default=None, max_length=64, pattern=PROJECT_PATTERN)
    model_version: str | None = Field(default=None, max_length=256)
    params: PredictParams | None = None


class BrushValue(BaseModel):
    format: Literal["rle"] = "rle"
    rle: list[int] = Field(description="Label Studio's brush RLE of the mask (bytes).")
    brushlabels: list[str]


class BrushRegion(BaseModel):
    """One predicted mask as a Label Studio ``brushlabels`` region."""

    id: str
    from_name: str
    to_name: str
    type: Literal["brushlabels"] = "brushlabels"
    original_width: int
    original_height: int
    image_rotation: int = 0
    value: BrushValue
    score: float
    readonly: bool = False


class TaskPrediction(BaseModel):
    """One task's prediction: its regions (none when the request had no prompt), the score
    and the version of the model that made it."""

    result: list[BrushRegion]
    score: float | None = None
    model_version: str


class PredictResponse(BaseModel):
    results: list[TaskPrediction]


class WebhookRequest(BaseModel):
    """A Label Studio webhook: ``action`` and, by action, ``annotation`` + ``task``
    (ANNOTATION_CREATED / _UPDATED), ``annotations`` (ANNOTATIONS_DELETED), ``project``."""

    model_config = _OPEN

    action: str = Field(max_length=64)
    project: dict[str, Any] | None = None


class WebhookResponse(BaseModel):
    """``ignored``: an action the backend does not act on. ``samples``: object masks stored
    for the annotation; ``removed``: annotations removed; ``job``: the continual step
    submitted (or already running) for the project's domain."""

    status: Literal["ok", "ignored", "running"]
    action: str
    domain: str | None = None
    samples: int = 0
    removed: int = 0
    pending: int | None = Field(default=None, description="Annotation changes since the "
                                "domain's last training snapshot.")
    job: str | None = None


class TrainRequest(BaseModel):
    """The legacy ``/train`` call: ``project`` is ``<id>.<created timestamp>``; the
    annotations it carries are not read (the webhooks keep the sample set)."""

    model_config = _OPEN

    project: str = Field(max_length=64, pattern=PROJECT_PATTERN)


class TrainResponse(BaseModel):
    status: Literal["ok", "running"]
    domain: str
    job: str
