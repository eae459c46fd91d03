"""What the HTTP client returns: plain dataclasses built from the service's JSON answers.

Field names are the API's (``service/api/schemas/``); each class has ``from_json``. Masks are
decoded: :class:`Mask` holds an H x W bool array, not the RLE or PNG it travelled as.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import numpy as np

from regcl.client.encoding import decode_logits, decode_mask

__all__ = [
    "TERMINAL_STATES",
    "Activation",
    "AdapterInfo",
    "BatchSegmentation",
    "DatasetInfo",
    "ImageInfo",
    "Job",
    "JobEvent",
    "LiveVersion",
    "Mask",
    "Matrix",
    "MatrixCell",
    "MatrixRow",
    "Readiness",
    "Route",
    "RouterInfo",
    "Segmentation",
    "VersionInfo",
]

TERMINAL_STATES = ("succeeded", "failed", "cancelled")


def _time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


@dataclass(frozen=True)
class ImageInfo:
    """A stored image: its id (a content hash) and size in pixels."""

    image_id: str
    width: int
    height: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ImageInfo:
        return cls(body["image_id"], int(body["width"]), int(body["height"]))


@dataclass(frozen=True)
class Embedding:
    """An image's embedding under one adapter version (``GET /v1/images/{id}/embedding``).

    features: 1 x C x h x w float32; adapter_version: ``base``, ``live:<n>`` or
    ``domain:<name>``; original_size: (H, W) of the image; input_size: (H', W') after
    resizing its long side to the model's input size; etag: send it back (``etag=``) to be
    told whether it is still current."""

    features: np.ndarray
    adapter_version: str
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    etag: str


@dataclass(frozen=True)
class Mask:
    """One mask. mask: H x W bool (the image's size); score: SAM's predicted IoU; area in
    pixels; bbox: COCO [x, y, w, h]; low_res_logits: side x side float32 (asked for with
    ``return_logits``; send it back as ``mask_input``), else None."""

    mask: np.ndarray
    score: float
    area: int
    bbox: tuple[int, int, int, int]
    low_res_logits: np.ndarray | None = None


def _masks(items: list[dict[str, Any]]) -> list[Mask]:
    return [Mask(decode_mask(m), float(m["score"]), int(m["area"]),
                 tuple(int(v) for v in m["bbox"]),  # type: ignore[arg-type]
                 decode_logits(m["low_res_logits"]) if m.get("low_res_logits") else None)
            for m in items]


@dataclass(frozen=True)
class Route:
    """What ``adapter="auto"`` chose: ``domain`` (None: it fell back to the live adapter,
    ``adapter_version`` says which), whether the route was ``confident`` (``margin`` over
    the runner-up ≥ ``min_margin`` and ``novelty`` ≤ ``max_novelty``), the best domain and
    every domain's score."""

    adapter_version: str
    domain: str | None
    revision: str | None
    confident: bool
    best: str | None
    margin: float | None
    novelty: float | None
    min_margin: float
    max_novelty: float
    scores: dict[str, float]

    @classmethod
    def from_json(cls, body: dict[str, Any] | None) -> Route | None:
        if body is None:
            return None
        return cls(**{f: body[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class RouterInfo:
    """The domain router behind ``adapter="auto"`` in one API process: ``domains`` (name →
    adapter sha256), ``skipped`` (name → why it is left out), the layer and block it reads,
    its state's size and digest, and its thresholds."""

    generation: int
    domains: dict[str, str]
    skipped: dict[str, str]
    layer: str | None
    block: int | None
    dim: int
    state_bytes: int
    state_sha256: str
    min_margin: float
    max_novelty: float

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> RouterInfo:
        fields = {f: body[f] for f in cls.__dataclass_fields__}
        fields["domains"] = {d["name"]: d["revision"] for d in body["domains"]}
        fields["skipped"] = {d["name"]: d["reason"] for d in body["skipped"]}
        return cls(**fields)


@dataclass(frozen=True)
class Segmentation:
    """Masks for one prompt, in SAM's order, and which adapter version made them (``base``,
    ``live:<n>`` or ``domain:<name>``; the body and the ``X-Regcl-Adapter-Version`` header
    agree, or the client raises); with ``adapter="auto"``, the :class:`Route` taken."""

    masks: list[Mask]
    adapter_version: str
    image_id: str
    cache_hit: bool
    route: Route | None = None

    @property
    def arrays(self) -> np.ndarray:
        """The masks stacked: N x H x W bool."""
        return np.stack([m.mask for m in self.masks])

    @property
    def scores(self) -> np.ndarray:
        """N float32 predicted IoUs."""
        return np.array([m.score for m in self.masks], dtype=np.float32)

    @property
    def best(self) -> Mask:
        """The mask with the highest score."""
        return max(self.masks, key=lambda m: m.score)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Segmentation:
        return cls(_masks(body["masks"]), body["adapter_version"], body["image_id"],
                   bool(body["cache_hit"]), Route.from_json(body.get("route")))


@dataclass(frozen=True)
class BatchSegmentation:
    """One :class:`Segmentation` per prompt, in the request's order (one adapter version,
    one image for all)."""

    results: list[Segmentation]
    adapter_version: str
    image_id: str
    cache_hit: bool
    route: Route | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> BatchSegmentation:
        version, image_id, hit = body["adapter_version"], body["image_id"], body["cache_hit"]
        route = Route.from_json(body.get("route"))
        return cls([Segmentation(_masks(r["masks"]), version, image_id, bool(hit), route)
                    for r in body["results"]], version, image_id, bool(hit), route)


@dataclass(frozen=True)
class AdapterInfo:
    """A domain adapter in the registry (``has_stats``: it can be RegCL-merged)."""

    name: str
    domain: str | None
    sha256: str
    size_bytes: int
    files: list[str]
    has_stats: bool
    metadata: dict[str, Any]
    created_at: datetime | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> AdapterInfo:
        return cls(body["name"], body.get("domain"), body["sha256"], int(body["size_bytes"]),
                   list(body["files"]), bool(body["has_stats"]), dict(body["metadata"]),
                   _time(body.get("created_at")))


@dataclass(frozen=True)
class DatasetInfo:
    """A stored dataset: format ``folders`` or ``coco``, count of samples."""

    name: str
    format: str
    count: int
    sha256: str
    size_bytes: int
    metadata: dict[str, Any]
    created_at: datetime | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> DatasetInfo:
        return cls(body["name"], body["format"], int(body["count"]), body["sha256"],
                   int(body["size_bytes"]), dict(body["metadata"]),
                   _time(body.get("created_at")))


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


@dataclass(frozen=True)
class Job:
    """A job record: state, progress in [0, 1] with a small ``detail`` (phase, step, loss...),
    and once finished its ``result`` or ``error`` (``{"type", "message"}``); ``worker``: the
    worker (Celery node name) that started its latest attempt."""

    id: str
    kind: str
    state: JobState
    progress: float
    detail: dict[str, Any]
    params: dict[str, Any]
    result: Any
    error: dict[str, str] | None
    cancel_requested: bool
    attempts: int
    created_at: datetime | None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    worker: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Job:
        return cls(body["id"], body["kind"], body["state"], float(body["progress"]),
                   dict(body.get("detail") or {}), dict(body.get("params") or {}),
                   body.get("result"), body.get("error"), bool(body["cancel_requested"]),
                   int(body["attempts"]), _time(body.get("created_at")),
                   _time(body.get("started_at")), _time(body.get("finished_at")),
                   body.get("worker"))


@dataclass(frozen=True)
class JobEvent:
    """One server-sent event of a job: ``event`` (``snapshot``, ``running``, ``progress``,
    ``succeeded``, ...), the job as of that event, and the event's id."""

    event: str
    job: Job
    id: int | None = None


@dataclass(frozen=True)
class VersionInfo:
    """A merged version; ``lineage`` says what it was made from, ``live`` whether the live
    pointer names it."""

    number: int
    sha256: str
    size_bytes: int
    lineage: dict[str, Any]
    created_at: datetime | None
    live: bool

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> VersionInfo:
        return cls(int(body["number"]), body["sha256"], int(body["size_bytes"]),
                   dict(body["lineage"]), _time(body.get("created_at")), bool(body["live"]))


@dataclass(frozen=True)
class LiveVersion:
    """The live pointer (``live_version``), what this API process serves (``served_version``)
    and what a ``live`` request reports now (``adapter_version``)."""

    live_version: int | None
    served_version: int | None
    adapter_version: str
    last_swap_error: str | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> LiveVersion:
        return cls(body.get("live_version"), body.get("served_version"),
                   body["adapter_version"], body.get("last_swap_error"))


@dataclass(frozen=True)
class Activation:
    """An activation's answer: the version now live, the one before, and what this process
    serves after its swap (``swap_seconds`` None: it was served already)."""

    version: VersionInfo
    previous_version: int | None
    served_version: int | None
    swap_seconds: float | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Activation:
        return cls(VersionInfo.from_json(body["version"]), body.get("previous_version"),
                   body.get("served_version"), body.get("swap_seconds"))


@dataclass(frozen=True)
class MatrixCell:
    """The newest succeeded evaluation of a row's model on a column's dataset."""

    iou: float
    dice: float | None
    mae: float | None
    count: int | None
    job_id: str
    finished_at: datetime | None = None


@dataclass(frozen=True)
class MatrixRow:
    """``base``, ``version:<n>`` or ``adapter:<name>`` with its scores by dataset."""

    target: str
    version: int | None
    adapter: str | None
    live: bool
    scores: dict[str, MatrixCell]


@dataclass(frozen=True)
class Matrix:
    """The continual matrix (model x dataset IoU); ``domains`` maps each dataset (column) to
    its domain, where known."""

    rows: list[MatrixRow]
    domains: dict[str, str | None]
    live_version: int | None
    jobs_scanned: int

    def iou(self, target: str, dataset: str) -> float | None:
        """One cell's IoU, or None if that pair was not evaluated."""
        row = next((r for r in self.rows if r.target == target), None)
        cell = None if row is None else row.scores.get(dataset)
        return None if cell is None else cell.iou

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Matrix:
        rows = [MatrixRow(r["target"], r.get("version"), r.get("adapter"), bool(r["live"]),
                          {name: MatrixCell(c["iou"], c.get("dice"), c.get("mae"),
                                            c.get("count"), c["job_id"],
                                            _time(c.get("finished_at")))
                           for name, c in r["scores"].items()})
                for r in body["rows"]]
        return cls(rows, {c["dataset"]: c.get("domain") for c in body["columns"]},
                   body.get("live_version"), int(body["jobs_scanned"]))


@dataclass(frozen=True)
class Readiness:
    """``/readyz``: ready when the model is loaded and Redis answers."""

    ready: bool
    model_loaded: bool
    redis: bool
    live_version: int | None
    served_version: int | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Readiness:
        return cls(body.get("status") == "ready", bool(body.get("model_loaded")),
                   bool(body.get("redis")), body.get("live_version"),
                   body.get("served_version"))
