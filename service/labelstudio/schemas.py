"""Requests and responses of the Label Studio ML backend routes (``/labelstudio``).

The shapes are Label Studio's (``label_studio/ml/api_connector.py`` sends them, and
``label_studio_ml/api.py`` of label-studio-ml-backend answers them). Requests carry many
fields regcl does not use (``extra="allow"``); the parts it uses are checked by
:mod:`service.labelstudio` with typed problems (``unsupported-result-type``,
``invalid-region``, ``invalid-brush-rle``, ...), not only by these schemas.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = [
    "BrushRegion",
    "BrushValue",
    "HealthResponse",
    "LabelStudioStatus",
    "PolygonRegion",
    "PolygonValue",
    "PredictParams",
    "PredictRequest",
    "PredictResponse",
    "ProjectServingResponse",
    "ProjectsServingResponse",
    "ServingCheckModel",
    "SetupRequest",
    "SetupResponse",
    "SyncRequest",
    "SyncResponse",
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


class LabelStudioStatus(BaseModel):
    """regcl's side of the connection to Label Studio: which token is configured and whether
    Label Studio accepted it at the last call (null: no call yet), with the problem of a
    refusal."""

    url: str | None = Field(description="REGCL_LABEL_STUDIO_URL (null: not set).")
    token: Literal["none", "legacy-token", "personal-access-token"]
    accepted: bool | None
    checked_at: float | None = Field(description="When Label Studio last answered a call "
                                     "made with the token (Unix time).")
    refreshes: int = Field(description="Access tokens obtained with the personal access "
                           "token so far.")
    problem: str | None = None
    storage_hosts: list[str] = Field(description="REGCL_LABEL_STUDIO_STORAGE_HOSTS, parsed.")


class HealthResponse(BaseModel):
    """``status`` is always ``UP`` when the service answers; ``model_version`` is the version
    predictions are made with now (``base`` or ``live:<n>``); ``label_studio``: the token and
    whether Label Studio took it."""

    status: Literal["UP"] = "UP"
    model_class: str = "regcl"
    model_version: str
    label_studio: LabelStudioStatus | None = None


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
    sync_job: str | None = Field(default=None, description="The sync job that extra params "
                                 "``\"sync\": true`` started (or found running).")
    preencode_job: str | None = Field(default=None, description="The job encoding the "
                                      "project's tasks without annotations ahead of their "
                                      "first click (started, or found running).")


def _no_bool(value: Any) -> Any:
    """JSON's ``true`` is no project id (lax ``int`` would take it as 1; ``12.0`` stays 12)."""
    if isinstance(value, bool):
        raise ValueError("a project id is an integer, not a boolean")
    return value


class SyncRequest(BaseModel):
    """``POST /labelstudio/sync``: the project whose existing annotations to store."""

    model_config = ConfigDict(extra="forbid")

    project: (Annotated[int, Field(ge=0, lt=10**18), BeforeValidator(_no_bool)]
              | Annotated[str, Field(max_length=64, pattern=PROJECT_PATTERN)]) = Field(
        description="The project id (or ``<id>.<timestamp>``).")


class PreencodeRequest(BaseModel):
    """``POST /labelstudio/preencode``: encode a project's tasks without annotations ahead of
    their first click."""

    model_config = ConfigDict(extra="forbid")

    project: (Annotated[int, Field(ge=0, lt=10**18), BeforeValidator(_no_bool)]
              | Annotated[str, Field(max_length=64, pattern=PROJECT_PATTERN)]) = Field(
        description="The project id (or ``<id>.<timestamp>``).")
    adapter: str = Field(default="live", min_length=1, max_length=64,
                         json_schema_extra={"not": {"const": "auto"}},
                         description="What serves the project: 'live' (default, what "
                         "predictions use), 'base' or an uploaded adapter's name; not 'auto' "
                         "(it chooses per click; answered 422 preencode-adapter).")


class PreencodeResponse(BaseModel):
    """A project's pre-encode job (follow it at ``/v1/jobs/{job}``): ``queued`` (started
    now), ``running`` (one with this adapter and version was active already) or the state of
    the latest job (``GET``, ``DELETE``). ``detail``: progress counts (tasks, annotated,
    encoded, written, stored, failed, bytes, total); ``result`` once it finished (with
    ``stopped: "budget"`` when the byte budget ended it)."""

    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    project: int
    job: str
    adapter: str
    version: str = Field(description="The adapter version it encodes with ('live:3', "
                         "'base', 'domain:<name>').")
    progress: float = 0.0
    cancel_requested: bool = False
    detail: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None


class SyncResponse(BaseModel):
    """The sync job (follow it at ``/v1/jobs/{job}`` and ``/v1/jobs/{job}/events``);
    ``running``: one was already active for the project, and this is it."""

    status: Literal["queued", "running"]
    project: int
    domain: str
    job: str


class ServingCheckModel(BaseModel):
    """A continual step's comparison of the domain's new adapter, alone, with the live version
    the step left, on the domain's held-out set (:mod:`infra.project_serving`)."""

    adapter: str
    sha256: str
    adapter_iou: float
    live: str = Field(description="The live version compared with: 'live:<n>' or 'base'.")
    live_iou: float
    samples: int
    job_id: str | None
    at: str = Field(description="When the step decided (ISO 8601, UTC).")
    passed: bool = Field(description="adapter_iou > live_iou: the adapter serves the "
                         "project from then on.")
    reason: str


class ProjectServingResponse(BaseModel):
    """What answers a project's predictions now, why, and since when."""

    project: int
    domain: str
    serves: Literal["domain", "auto", "live"] = Field(
        description="'domain': the project's own adapter; 'auto': the router chooses a "
        "domain adapter or falls back to live; 'live': the live merge.")
    adapter: str = Field(description="What the engine is asked for: the adapter's name, "
                         "'auto' or 'live'.")
    model_version: str = Field(description="What predictions report now when it is known "
                               "before the image: 'domain:<name>@<sha8>', 'live:<n>', 'base', "
                               "or 'auto' (each prediction then names the adapter chosen).")
    reason: str
    since: str | None = Field(description="When the project's own adapter began to serve "
                              "(None: it has none).")
    check: ServingCheckModel | None = Field(description="The check that made the adapter "
                                            "the project's.")
    last_check: ServingCheckModel | None = Field(description="The latest step's check, "
                                                 "passed or not.")
    history: list[dict[str, Any]] = Field(description="Earlier changes of the project's own "
                                          "adapter, oldest first (at most 20).")


class ProjectsServingResponse(BaseModel):
    """Every project regcl knows (configured at setup, or with a sample set or a step)."""

    projects: list[ProjectServingResponse]


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


class PolygonValue(BaseModel):
    points: list[list[float]] = Field(description="Vertices [x, y] in percent of the image "
                                      "width and height, closed.")
    polygonlabels: list[str]
    closed: bool = True


class PolygonRegion(BaseModel):
    """One connected part of a predicted mask as a Label Studio ``polygonlabels`` region."""

    id: str
    from_name: str
    to_name: str
    type: Literal["polygonlabels"] = "polygonlabels"
    original_width: int
    original_height: int
    image_rotation: int = 0
    value: PolygonValue
    score: float
    readonly: bool = False


class TaskPrediction(BaseModel):
    """One task's prediction: its regions (none when the request had no prompt), the score
    and the version of the model that made it."""

    result: list[BrushRegion | PolygonRegion]
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
    """``ignored``: an action the backend does not act on. ``queued``: the event is checked
    and recorded (in Redis) while others are being stored; it is stored in arrival order, and
    ``samples`` / ``annotations`` say what it holds. ``samples``: object masks stored
    for the annotation; ``removed``: annotations removed; ``job``: the continual step
    submitted (or already running) for the project's domain."""

    status: Literal["ok", "ignored", "running", "queued"]
    action: str
    domain: str | None = None
    samples: int = 0
    removed: int = 0
    pending: int | None = Field(default=None, description="Annotation changes since the "
                                "domain's last training snapshot.")
    job: str | None = None
    annotations: int = Field(default=0, description="Annotations in the event.")
    unchanged: int = Field(default=0, description="Annotations whose version was stored "
                           "already (nothing written).")
    failed: list[dict[str, Any]] = Field(default_factory=list, description="ANNOTATIONS_"
                                         "CREATED: annotations whose image could not be had "
                                         "(the others are stored; a sync stores these later).")


class TrainRequest(BaseModel):
    """The legacy ``/train`` call: ``project`` is ``<id>.<created timestamp>``; the
    annotations it carries are not read (the webhooks keep the sample set)."""

    model_config = _OPEN

    project: str = Field(max_length=64, pattern=PROJECT_PATTERN)


class TrainResponse(BaseModel):
    status: Literal["ok", "running"]
    domain: str
    job: str
