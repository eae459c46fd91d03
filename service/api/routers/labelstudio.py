"""``/labelstudio``: regcl as Label Studio's ML backend (paste ``http://HOST:8000/labelstudio``
into a project's Model settings).

- ``GET /labelstudio/health`` and ``GET /labelstudio/``: up, with the model version and the
  token's kind and whether Label Studio took it at the last call (fast, no Redis, no call to
  Label Studio: it waits 1 s); ``?check=true`` makes one call to Label Studio first and
  answers its refusal as a problem;
- ``POST /labelstudio/setup``: the model version (and the project's domain); stores the
  connection's extra params, which needs the admin key (``"sync": true`` there starts a sync);
- ``POST /labelstudio/sync``: the sync job of a project's existing annotations (admin key);
- ``POST /labelstudio/preencode``, ``GET`` and ``DELETE /labelstudio/preencode/{project}``:
  start, see and cancel the job that encodes a project's tasks without annotations ahead of
  their first click (admin key; setup starts one with ``live`` too);
- ``POST /labelstudio/predict``: brush masks for the interactive prompt; open unless
  ``REGCL_SEGMENT_REQUIRES_KEY``;
- ``GET /labelstudio/projects`` and ``GET /labelstudio/projects/{project}``: what serves each
  project (its own adapter, auto or live), with the step's numbers and since when;
- ``POST /labelstudio/webhook``: annotations created, updated, deleted, and Start Training;
  ``POST /labelstudio/train``: the legacy training call. Both need the admin key.

A key is accepted as Bearer, X-API-Key or the password of HTTP basic auth (Label Studio's
connection setting). Logic lives in :mod:`service.labelstudio`.
"""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Path, Request

from infra.jobs import JobRecord
from service.api.deps import (
    AdminKey,
    CeleryDep,
    PresentedKey,
    RuntimeDep,
    celery_of,
    check_admin,
    require_segment_access,
)
from service.api.problems import problem_responses
from service.api.runtime import Runtime
from service.labelstudio.backend import (
    BULK_ACTIONS,
    DELETE_ACTIONS,
    INGEST_ACTIONS,
    TRAIN_ACTION,
    LabelStudioBackend,
    parse_extra_params,
    project_id_of,
)
from service.labelstudio.errors import NoPreencodeError
from service.labelstudio.schemas import (
    HealthResponse,
    LabelStudioStatus,
    PredictRequest,
    PredictResponse,
    PreencodeRequest,
    PreencodeResponse,
    ProjectServingResponse,
    ProjectsServingResponse,
    SetupRequest,
    SetupResponse,
    SyncRequest,
    SyncResponse,
    TrainRequest,
    TrainResponse,
    WebhookRequest,
    WebhookResponse,
)

router = APIRouter(prefix="/labelstudio", tags=["labelstudio"])
_backend_lock = threading.Lock()


def open_backend(app: FastAPI, runtime: Runtime) -> LabelStudioBackend:
    """Make the app's backend at startup, so its ingest queue's consumer stores what an
    earlier process left queued without waiting for a webhook."""
    with _backend_lock:
        backend = LabelStudioBackend(runtime)
        app.state.labelstudio = backend
    return backend


def close_backend(app: FastAPI) -> None:
    """Stop the backend's threads (the queue's consumer, the sync pool) at shutdown."""
    backend: LabelStudioBackend | None = getattr(app.state, "labelstudio", None)
    app.state.labelstudio = None
    if backend is not None:
        backend.close()


def get_backend(request: Request, runtime: RuntimeDep) -> LabelStudioBackend:
    """The app's backend, made on first use (it holds an HTTP client and the URL cache)."""
    backend: LabelStudioBackend | None = getattr(request.app.state, "labelstudio", None)
    if backend is None or backend.runtime is not runtime:
        with _backend_lock:
            backend = getattr(request.app.state, "labelstudio", None)
            if backend is None or backend.runtime is not runtime:
                backend = LabelStudioBackend(runtime)
                request.app.state.labelstudio = backend
    return backend


BackendDep = Annotated[LabelStudioBackend, Depends(get_backend)]


@router.get("/health", response_model=HealthResponse, responses=problem_responses(502, 503))
@router.get("/", response_model=HealthResponse, responses=problem_responses(502, 503),
            include_in_schema=False)
def health(runtime: RuntimeDep, backend: BackendDep, check: bool = False) -> HealthResponse:
    """``{"status": "UP", "model_class": "regcl", "model_version": ..., "label_studio":
    {"token": ..., "accepted": ...}}``. ``check=true``: one call to Label Studio first (its
    current user, with the token); a refused token is then a 502 problem."""
    if check:
        backend.check_connection()
    connection = backend.connection
    status = connection.auth.status()
    return HealthResponse(model_version=runtime.engine.adapters.live_label,
                          label_studio=LabelStudioStatus(
                              url=None if connection.origin is None else connection.origin.url,
                              token=status.kind.value, accepted=status.accepted,
                              checked_at=status.checked_at, refreshes=status.refreshes,
                              problem=status.problem,
                              storage_hosts=[e.text for e in connection.storage.entries]))


@router.post("/setup", response_model=SetupResponse,
             dependencies=[Depends(require_segment_access)],
             responses=problem_responses(400, 401, 403, 422, 503))
def setup(body: SetupRequest, backend: BackendDep, key: PresentedKey) -> SetupResponse:
    """Connect a project: answers the model version. With extra params (``domain``, step
    parameters) it stores them for the project, which needs the admin key."""
    project_id = project_id_of(body.project)
    extra = parse_extra_params(body.extra_params)
    sync_job = None
    if extra:
        check_admin(backend.runtime.settings, key)
        settings = backend.configure(project_id, extra)
        if extra.get("sync") is True:
            sync_job = backend.start_sync(project_id)[1]
    else:
        settings = backend.project_settings(project_id)
    serving = backend.serving.for_project(project_id)
    return SetupResponse(model_version=backend.serving.model_version(serving),
                         domain=settings.domain, sync_job=sync_job,
                         preencode_job=backend.preencode_on_setup(project_id))


@router.post("/sync", response_model=SyncResponse, status_code=202,
             responses=problem_responses(400, 401, 403, 422, 503))
def sync(body: SyncRequest, backend: BackendDep, _: AdminKey) -> SyncResponse:
    """Start the sync of a project's existing annotations into its domain's sample set (a job:
    ``/v1/jobs/{job}``, its events at ``/v1/jobs/{job}/events``); idempotent and resumable.
    A sync already active for the project is answered (``status: running``)."""
    project_id = project_id_of(body.project)
    domain, job, running = backend.start_sync(project_id)
    return SyncResponse(status="running" if running else "queued", project=project_id,
                        domain=domain, job=job)


def _preencode_response(record: JobRecord, status: str | None = None) -> PreencodeResponse:
    params = record.params
    return PreencodeResponse(status=status or record.state.value, project=params["project"],
                             job=record.id, adapter=params["adapter"],
                             version=params["version"], progress=record.progress,
                             cancel_requested=record.cancel_requested, detail=record.detail,
                             result=record.result if isinstance(record.result, dict) else None)


@router.post("/preencode", response_model=PreencodeResponse, status_code=202,
             responses=problem_responses(400, 401, 403, 404, 409, 422, 503))
def preencode(body: PreencodeRequest, backend: BackendDep, _: AdminKey) -> PreencodeResponse:
    """Start encoding a project's tasks without annotations (Label Studio's task order, up to
    ``REGCL_LABEL_STUDIO_PREENCODE_MAX_BYTES``) into the embedding store, so their first
    click costs the decoder only. A job with the same adapter and version already active is
    answered (``status: running``); one with another is asked to stop. 404: an unknown
    adapter; 409: pre-encoding is off."""
    record, running = backend.preencode(project_id_of(body.project), body.adapter)
    return _preencode_response(record, "running" if running else "queued")


@router.get("/preencode/{project}", response_model=PreencodeResponse,
            responses=problem_responses(401, 403, 404, 422, 503))
def preencode_status(project: Annotated[int, Path(ge=0, lt=10**18)], backend: BackendDep,
                     _: AdminKey) -> PreencodeResponse:
    """The project's latest pre-encode job; 404 if it never had one."""
    record = backend.preencoder.status(project)
    if record is None:
        raise NoPreencodeError(f"project {project} has no pre-encode job")
    return _preencode_response(record)


@router.delete("/preencode/{project}", response_model=PreencodeResponse,
               responses=problem_responses(401, 403, 404, 422, 503))
def preencode_cancel(project: Annotated[int, Path(ge=0, lt=10**18)], backend: BackendDep,
                     _: AdminKey) -> PreencodeResponse:
    """Ask the project's active pre-encode job to stop (it stops before its next task;
    ``cancel_requested`` until then); 404 if none is active."""
    record = backend.preencoder.cancel(project)
    if record is None:
        raise NoPreencodeError(f"project {project} has no active pre-encode job")
    return _preencode_response(record)


@router.post("/predict", response_model=PredictResponse,
             dependencies=[Depends(require_segment_access)],
             responses=problem_responses(400, 401, 404, 413, 422, 502, 503))
def predict(body: PredictRequest, backend: BackendDep) -> PredictResponse:
    """One prediction per task: a brush mask for the interactive prompt in
    ``params.context.result`` (smart keypoints, a rectangle), with ``model_version``; no
    prompt, no mask."""
    return backend.predict(body)


@router.get("/projects", response_model=ProjectsServingResponse,
            dependencies=[Depends(require_segment_access)], responses=problem_responses(401))
def projects(backend: BackendDep) -> ProjectsServingResponse:
    """What serves each project regcl knows (configured at setup, or with annotations or a
    continual step), with the numbers of the step that decided it and since when."""
    return ProjectsServingResponse(projects=[backend.serving.describe(p)
                                             for p in backend.serving.known_projects()])


@router.get("/projects/{project}", response_model=ProjectServingResponse,
            dependencies=[Depends(require_segment_access)], responses=problem_responses(401))
def project_serving(project: Annotated[int, Path(ge=0, lt=10**18)],
                    backend: BackendDep) -> ProjectServingResponse:
    """What serves the project's predictions: its own domain adapter (once a continual step
    found it better than live on the project's held-out set), else auto, else live."""
    return backend.serving.describe(project)


@router.post("/webhook", response_model=WebhookResponse,
             responses=problem_responses(400, 401, 403, 409, 413, 422, 502, 503))
def webhook(body: WebhookRequest, backend: BackendDep, _: AdminKey,
            runtime: RuntimeDep) -> WebhookResponse:
    """Label Studio's events: ANNOTATION_CREATED / ANNOTATION_UPDATED store the annotation's
    masks in the project's domain (ANNOTATIONS_CREATED: each of its annotations),
    ANNOTATIONS_DELETED removes them, START_TRAINING submits
    the continual step; other actions are ignored. While other events are being stored, an
    annotation event is checked, recorded and answered ``queued`` at once (stored in arrival
    order by a consumer; nothing is lost if the process restarts)."""
    extra = body.model_extra or {}
    if body.action in INGEST_ACTIONS:
        return backend.receive(body.action, body.project, extra.get("annotation"),
                               extra.get("task"))
    if body.action in BULK_ACTIONS:
        return backend.receive_many(body.action, body.project, extra.get("annotation"),
                                    extra.get("task"))
    if body.action in DELETE_ACTIONS:
        annotations = extra.get("annotations", [extra.get("annotation")])
        return backend.receive_removal(body.action, body.project, annotations)
    if body.action == TRAIN_ACTION:
        domain, job, running = backend.train(project_id_of(body.project), celery_of(runtime))
        return WebhookResponse(status="running" if running else "ok", action=body.action,
                               domain=domain, job=job)
    return WebhookResponse(status="ignored", action=body.action)


@router.post("/train", response_model=TrainResponse,
             responses=problem_responses(400, 401, 403, 409, 422, 503))
def train(body: TrainRequest, backend: BackendDep, _: AdminKey,
          celery: CeleryDep) -> TrainResponse:
    """The legacy training call: submits the project's continual step."""
    domain, job, running = backend.train(project_id_of(body.project), celery)
    return TrainResponse(status="running" if running else "ok", domain=domain, job=job)
