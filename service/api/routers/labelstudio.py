"""``/labelstudio``: regcl as Label Studio's ML backend (paste ``http://HOST:8000/labelstudio``
into a project's Model settings).

- ``GET /labelstudio/health`` and ``GET /labelstudio/``: up, with the model version and the
  token's kind and whether Label Studio took it at the last call (fast, no Redis, no call to
  Label Studio: it waits 1 s); ``?check=true`` makes one call to Label Studio first and
  answers its refusal as a problem;
- ``POST /labelstudio/setup``: the model version (and the project's domain); stores the
  connection's extra params, which needs the admin key (``"sync": true`` there starts a sync);
- ``POST /labelstudio/sync``: the sync job of a project's existing annotations (admin key);
- ``POST /labelstudio/predict``: brush masks for the interactive prompt; open unless
  ``REGCL_SEGMENT_REQUIRES_KEY``;
- ``POST /labelstudio/webhook``: annotations created, updated, deleted, and Start Training;
  ``POST /labelstudio/train``: the legacy training call. Both need the admin key.

A key is accepted as Bearer, X-API-Key or the password of HTTP basic auth (Label Studio's
connection setting). Logic lives in :mod:`service.labelstudio`.
"""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request

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
from service.labelstudio.schemas import (
    HealthResponse,
    LabelStudioStatus,
    PredictRequest,
    PredictResponse,
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
    return SetupResponse(model_version=backend.model_version, domain=settings.domain,
                         sync_job=sync_job)


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


@router.post("/predict", response_model=PredictResponse,
             dependencies=[Depends(require_segment_access)],
             responses=problem_responses(400, 401, 404, 413, 422, 502, 503))
def predict(body: PredictRequest, backend: BackendDep) -> PredictResponse:
    """One prediction per task: a brush mask for the interactive prompt in
    ``params.context.result`` (smart keypoints, a rectangle), with ``model_version``; no
    prompt, no mask."""
    return backend.predict(body)


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
