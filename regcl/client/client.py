"""The typed HTTP client of the regcl service (httpx, synchronous, thread-safe).

    from regcl.client import Client

    with Client("http://127.0.0.1:8000", admin_key="...") as c:
        seg = c.segment("photo.png", points=[[120, 80]])   # masks: N x H x W bool
        job = c.wait(c.submit_train("my-data", "polyp", epochs=3), timeout=3600, check=True)

Every error answer raises the :class:`~regcl.client.errors.ApiError` subclass of its status
with the problem's ``type``; an unreachable service raises
:class:`~regcl.client.errors.ApiConnectionError`.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from regcl.client.encoding import (
    ImageLike,
    b64,
    encode_mask_input,
    extract_zip,
    image_bytes,
    parse_sse,
    zip_folder,
)
from regcl.client.errors import (
    ApiConnectionError,
    JobFailedError,
    JobTimeoutError,
    ProtocolError,
    WaitTimeoutError,
    error_from_response,
)
from regcl.client.models import (
    Activation,
    AdapterInfo,
    BatchSegmentation,
    DatasetInfo,
    Embedding,
    ImageInfo,
    Job,
    JobEvent,
    LiveVersion,
    Matrix,
    Readiness,
    RouterInfo,
    Segmentation,
    VersionInfo,
)

__all__ = ["DEFAULT_URL", "VERSION_HEADER", "Client"]

DEFAULT_URL = "http://127.0.0.1:8000"
VERSION_HEADER = "X-Regcl-Adapter-Version"
SSE_READ_TIMEOUT_S = 60.0  # the service sends a keep-alive every 15 s
ADAPTER_FILES = {"adapter_config": "adapter_config.json",
                 "adapter_model": "adapter_model.safetensors",
                 "regcl_stats": "regcl_stats.safetensors"}


def _list(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _prompt(points: Any = None, labels: Any = None, box: Any = None, mask_input: Any = None
            ) -> dict[str, Any]:
    """One prompt's JSON fields; labels default to foreground (1) for every point."""
    body: dict[str, Any] = {}
    if points is not None:
        body["points"] = _list(points)
        body["labels"] = _list(labels) if labels is not None else [1] * len(body["points"])
    elif labels is not None:
        body["labels"] = _list(labels)
    if box is not None:
        body["box"] = _list(box)
    if mask_input is not None:
        body["mask_input"] = encode_mask_input(mask_input)
    return body


class Client:
    """The whole regcl HTTP API. ``admin_key`` is sent as ``Authorization: Bearer`` (needed
    for uploads, jobs and activations, and for segmentation where the service requires it).
    ``timeout``: seconds per request (a new image's first segmentation encodes it)."""

    def __init__(self, url: str = DEFAULT_URL, admin_key: str | None = None, *,
                 timeout: float = 120.0, transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, accept: Sequence[int] = (),
                 **kwargs: Any) -> httpx.Response:
        """The answer to one request; an error status raises its ApiError."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiConnectionError(f"{method} {self.url}{path}: {type(exc).__name__}: "
                                     f"{exc or 'no answer'}") from exc
        if not response.is_success and response.status_code not in accept:
            raise error_from_response(response.status_code, response.content, method, path,
                                      response.reason_phrase, response.headers)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # -- health ----------------------------------------------------------------------------

    def health(self) -> bool:
        """Whether the API process answers ``/healthz`` (ApiConnectionError if unreachable)."""
        return self._json("GET", "/healthz").get("status") == "ok"

    def ready(self) -> Readiness:
        """``/readyz``: model loaded and Redis reachable (503 is an answer here, not an
        error)."""
        return Readiness.from_json(self._json("GET", "/readyz", accept=(503,)))

    def wait_ready(self, timeout: float = 120.0, poll_s: float = 0.5) -> Readiness:
        """Poll ``/readyz`` (an unreachable service counts as not ready) until ready;
        WaitTimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                readiness = self.ready()
                if readiness.ready:
                    return readiness
                why = f"model loaded {readiness.model_loaded}, Redis {readiness.redis}"
            except ApiConnectionError as exc:
                why = str(exc)
            if time.monotonic() > deadline:
                raise WaitTimeoutError(f"{self.url} not ready after {timeout:.0f} s ({why})")
            time.sleep(poll_s)

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics``."""
        return self._request("GET", "/metrics").text

    # -- images and segmentation ------------------------------------------------------------

    def upload_image(self, image: ImageLike) -> ImageInfo:
        """Store an image (its embedding is computed on first use); segment it by passing the
        returned :class:`ImageInfo` (or its ``image_id``)."""
        files = {"file": ("image", image_bytes(image), "application/octet-stream")}
        return ImageInfo.from_json(self._json("POST", "/v1/images", files=files))

    @staticmethod
    def _image_fields(image: ImageLike | ImageInfo | None, image_id: str | None
                      ) -> dict[str, Any]:
        if isinstance(image, ImageInfo):
            image, image_id = None, image.image_id
        if (image is None) == (image_id is None):
            raise TypeError("give exactly one of image and image_id")
        return {"image_id": image_id} if image is None else {
            "image_base64": b64(image_bytes(image))}

    def _segment_call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self._request("POST", path, json=body)
        data = response.json()
        header = response.headers.get(VERSION_HEADER)
        if header is not None and header != data.get("adapter_version"):
            raise ProtocolError(f"{path}: header {VERSION_HEADER} says {header!r}, the body "
                                f"{data.get('adapter_version')!r}")
        return data

    def segment(self, image: ImageLike | ImageInfo | None = None, *, image_id: str | None = None,
                points: Any = None, labels: Any = None, box: Any = None, mask_input: Any = None,
                multimask: bool = True, adapter: str = "live", return_logits: bool = False,
                mask_format: str = "rle") -> Segmentation:
        """Masks for one prompt on ``image`` (sent inline) or an uploaded ``image_id``.

        points: N x 2 ``[[x, y], ...]`` pixels; labels: N (1 foreground, 0 background;
        default all 1); box: ``[x0, y0, x1, y1]``; mask_input: side x side logits of an
        earlier :class:`~regcl.client.models.Mask` (or the Mask); adapter: ``live``,
        ``base``, an uploaded adapter's name, or ``auto`` (the server's domain router picks
        one from the image, else ``live`` serves; the result's ``route`` says which).
        ``mask_format`` is how masks travel (``rle`` or ``png``); either way they come back
        decoded."""
        body = {**self._image_fields(image, image_id),
                **_prompt(points, labels, box, mask_input), "multimask": multimask,
                "adapter": adapter, "return_logits": return_logits, "format": mask_format}
        return Segmentation.from_json(self._segment_call("/v1/segment", body))

    def embedding(self, image: ImageInfo | str, adapter: str = "live", *,
                  etag: str | None = None) -> Embedding | None:
        """The embedding of an uploaded image (its :class:`ImageInfo` or id) under
        ``adapter``, to decode with :meth:`decoder_onnx`; None if ``etag`` (an earlier
        :attr:`Embedding.etag`) is still current."""
        image_id = image.image_id if isinstance(image, ImageInfo) else image
        headers = {"If-None-Match": etag} if etag else {}
        response = self._request("GET", f"/v1/images/{image_id}/embedding",
                                 params={"adapter": adapter}, headers=headers, accept=(304,))
        if response.status_code == 304:
            return None

        def size(name: str) -> tuple[int, int]:
            h, w = response.headers[name].split(",")
            return int(h), int(w)

        features = np.load(io.BytesIO(response.content), allow_pickle=False)
        return Embedding(features, response.headers[VERSION_HEADER],
                         size("X-Regcl-Original-Size"), size("X-Regcl-Input-Size"),
                         response.headers["ETag"])

    def decoder_onnx(self) -> bytes:
        """The served model's prompt encoder + mask decoder as an ONNX file (segment-anything's
        ``SamOnnxModel``; inputs and outputs in the API's description of the route)."""
        return self._request("GET", "/v1/models/decoder.onnx").content

    def segment_batch(self, image: ImageLike | ImageInfo | None = None,
                      prompts: Sequence[Mapping[str, Any]] = (), *, image_id: str | None = None,
                      multimask: bool = True, adapter: str = "live",
                      return_logits: bool = False, mask_format: str = "rle"
                      ) -> BatchSegmentation:
        """Several prompts (up to 64; each a mapping of ``points``, ``labels``, ``box``,
        ``mask_input`` as in :meth:`segment`) on one image, in one request."""
        body = {**self._image_fields(image, image_id),
                "prompts": [_prompt(**dict(p)) for p in prompts], "multimask": multimask,
                "adapter": adapter, "return_logits": return_logits, "format": mask_format}
        return BatchSegmentation.from_json(self._segment_call("/v1/segment/batch", body))

    def router(self) -> RouterInfo:
        """The domain router behind ``adapter="auto"`` in the API process that answers."""
        return RouterInfo.from_json(self._json("GET", "/v1/router"))

    # -- adapters ---------------------------------------------------------------------------

    def upload_adapter(self, name: str, directory: str | Path, *, domain: str | None = None,
                       metadata: Mapping[str, Any] | None = None) -> AdapterInfo:
        """Upload a PEFT LoRA adapter directory (``adapter_config.json``,
        ``adapter_model.safetensors`` and, to be mergeable, ``regcl_stats.safetensors``)."""
        directory = Path(directory)
        files = {field: (file, (directory / file).read_bytes(), "application/octet-stream")
                 for field, file in ADAPTER_FILES.items() if (directory / file).is_file()}
        data: dict[str, str] = {"name": name}
        if domain is not None:
            data["domain"] = domain
        if metadata is not None:
            data["metadata"] = json.dumps(dict(metadata))
        body = self._json("POST", "/v1/adapters", data=data, files=files)
        return AdapterInfo.from_json(body["adapter"])

    def list_adapters(self) -> list[AdapterInfo]:
        return [AdapterInfo.from_json(a) for a in self._json("GET", "/v1/adapters")["adapters"]]

    def get_adapter(self, name: str) -> AdapterInfo:
        return AdapterInfo.from_json(self._json("GET", f"/v1/adapters/{name}"))

    def download_adapter(self, name: str, directory: str | Path) -> Path:
        """Download an adapter and unpack it into ``directory``; returns its folder
        (``directory/<name>``)."""
        data = self._request("GET", f"/v1/adapters/{name}/download").content
        extract_zip(data, Path(directory))
        return Path(directory) / name

    def delete_adapter(self, name: str) -> None:
        self._request("DELETE", f"/v1/adapters/{name}")

    # -- datasets ---------------------------------------------------------------------------

    def upload_dataset(self, name: str, source: str | Path | bytes, *,
                       metadata: Mapping[str, Any] | None = None) -> DatasetInfo:
        """Upload a dataset: a folder (zipped here), a zip file's path, or zip bytes."""
        if isinstance(source, bytes):
            archive = source
        else:
            source = Path(source)
            archive = zip_folder(source) if source.is_dir() else source.read_bytes()
        data = {"name": name}
        if metadata is not None:
            data["metadata"] = json.dumps(dict(metadata))
        files = {"file": (f"{name}.zip", archive, "application/zip")}
        return DatasetInfo.from_json(self._json("POST", "/v1/datasets", data=data,
                                                files=files)["dataset"])

    def list_datasets(self) -> list[DatasetInfo]:
        return [DatasetInfo.from_json(d) for d in self._json("GET", "/v1/datasets")["datasets"]]

    def get_dataset(self, name: str) -> DatasetInfo:
        return DatasetInfo.from_json(self._json("GET", f"/v1/datasets/{name}"))

    def delete_dataset(self, name: str) -> None:
        self._request("DELETE", f"/v1/datasets/{name}")

    # -- jobs -------------------------------------------------------------------------------

    def _submit(self, kind: str, body: dict[str, Any]) -> Job:
        return Job.from_json(self._json("POST", f"/v1/jobs/{kind}", json=body)["job"])

    def submit_train(self, dataset: str, domain: str, **params: Any) -> Job:
        """Train a LoRA adapter for ``domain`` on ``dataset`` (params: ``adapter`` (its name,
        default the domain), ``epochs``, ``rank``, ``batch_size``, ``lr``, ...)."""
        return self._submit("train", {"dataset": dataset, "domain": domain, "params": params})

    def submit_merge(self, adapters: Sequence[str], *, method: str | None = None,
                     params: Mapping[str, Any] | None = None, activate: bool = False,
                     fresh: bool = False) -> Job:
        """Fold ``adapters`` into the latest version's merge state (``method``: the service's
        default unless given); the result is a new version, made live if ``activate``."""
        body: dict[str, Any] = {"adapters": list(adapters), "activate": activate,
                                "fresh": fresh}
        if method is not None:
            body["method"] = method
        if params is not None:
            body["params"] = dict(params)
        return self._submit("merge", body)

    def submit_evaluate(self, datasets: Sequence[str], *, version: int | None = None,
                        adapter: str | None = None, params: Mapping[str, Any] | None = None
                        ) -> Job:
        """Score a ``version``, an ``adapter`` or (neither) the base model on ``datasets``."""
        body: dict[str, Any] = {"datasets": list(datasets), "version": version,
                                "adapter": adapter}
        if params is not None:
            body["params"] = dict(params)
        return self._submit("evaluate", body)

    def submit_stats(self, adapter: str, dataset: str, *,
                     params: Mapping[str, Any] | None = None) -> Job:
        """Compute Gram statistics for ``adapter`` on ``dataset`` (a new adapter,
        ``params["output"]``, default ``<adapter>-stats``)."""
        body: dict[str, Any] = {"adapter": adapter, "dataset": dataset}
        if params is not None:
            body["params"] = dict(params)
        return self._submit("stats", body)

    def get_job(self, job: str | Job) -> Job:
        job_id = job.id if isinstance(job, Job) else job
        return Job.from_json(self._json("GET", f"/v1/jobs/{job_id}"))

    def list_jobs(self, kind: str | None = None, limit: int = 50) -> list[Job]:
        """The newest jobs first (of one ``kind``: train, merge, evaluate, stats)."""
        params: dict[str, Any] = {"limit": limit}
        if kind is not None:
            params["kind"] = kind
        return [Job.from_json(j) for j in self._json("GET", "/v1/jobs", params=params)["jobs"]]

    def cancel_job(self, job: str | Job) -> Job:
        """Cancel a job: a queued one at once, a running one at its next check (409
        ConflictError if it has finished)."""
        job_id = job.id if isinstance(job, Job) else job
        return Job.from_json(self._json("POST", f"/v1/jobs/{job_id}/cancel")["job"])

    def events(self, job: str | Job, *, deadline: float | None = None) -> Iterator[JobEvent]:
        """The job's server-sent events: a ``snapshot`` first, then each change, until the job
        has finished (the stream ends) or ``time.monotonic()`` passes ``deadline``."""
        job_id = job.id if isinstance(job, Job) else job
        path = f"/v1/jobs/{job_id}/events"
        read = SSE_READ_TIMEOUT_S if deadline is None else \
            min(SSE_READ_TIMEOUT_S, max(deadline - time.monotonic(), 0.0) + 1.0)
        timeout = httpx.Timeout(self._http.timeout.connect, read=read)
        try:
            with self._http.stream("GET", path, timeout=timeout) as response:
                if not response.is_success:
                    response.read()
                    raise error_from_response(response.status_code, response.content, "GET",
                                              path, response.reason_phrase, response.headers)
                for sse in parse_sse(response.iter_lines()):
                    if sse is not None:
                        data = json.loads(sse.data)
                        yield JobEvent(sse.event, Job.from_json(data["job"]),
                                       int(sse.id) if sse.id and sse.id.isdigit() else None)
                    if deadline is not None and time.monotonic() > deadline:
                        return
        except httpx.ReadTimeout as exc:
            if deadline is not None and time.monotonic() >= deadline:
                return  # nothing happened before the deadline
            raise ApiConnectionError(f"GET {path}: no event or keep-alive for {read:.0f} s"
                                     ) from exc
        except httpx.TransportError as exc:
            raise ApiConnectionError(f"GET {path}: {type(exc).__name__}: {exc}") from exc

    def wait(self, job: str | Job, timeout: float = 3600.0, *, check: bool = False,
             on_event: Callable[[JobEvent], None] | None = None, poll_s: float = 0.5) -> Job:
        """The job once finished: followed by its events (SSE), by polling if the stream
        breaks. ``on_event`` sees every event (``poll`` for a polled record).
        JobTimeoutError after ``timeout`` seconds; with ``check``, JobFailedError unless the
        job succeeded."""
        job_id = job.id if isinstance(job, Job) else job
        deadline = time.monotonic() + timeout
        last: Job | None = None
        try:
            for event in self.events(job_id, deadline=deadline):
                last = event.job
                if on_event is not None:
                    on_event(event)
                if last.finished:
                    break
        except (ApiConnectionError, json.JSONDecodeError, KeyError, TypeError):
            pass  # the stream broke (or sent what is not a job event): poll instead
        while last is None or not last.finished:
            if time.monotonic() > deadline:
                state = "unknown" if last is None else last.state
                raise JobTimeoutError(f"job {job_id} not finished after {timeout:.0f} s "
                                      f"(state {state})", last)
            if last is not None:
                time.sleep(poll_s)
            last = self.get_job(job_id)
            if on_event is not None:
                on_event(JobEvent("poll", last))
        if check and last.state != "succeeded":
            error = last.error or {}
            raise JobFailedError(f"{last.kind} job {job_id} {last.state}: "
                                 f"{error.get('type', '')} {error.get('message', '')}".rstrip(),
                                 last)
        return last

    # -- versions ---------------------------------------------------------------------------

    def list_versions(self) -> list[VersionInfo]:
        """Every merged version, oldest first."""
        return [VersionInfo.from_json(v) for v in self._json("GET", "/v1/versions")["versions"]]

    def get_version(self, number: int) -> VersionInfo:
        return VersionInfo.from_json(self._json("GET", f"/v1/versions/{number}"))

    def live_version(self) -> LiveVersion:
        """The live pointer and what this API process serves."""
        return LiveVersion.from_json(self._json("GET", "/v1/versions/live"))

    def activate(self, number: int) -> Activation:
        """Make version ``number`` live (rolling back is activating an older one)."""
        return Activation.from_json(self._json("POST", f"/v1/versions/{number}/activate"))

    def matrix(self, limit: int | None = None) -> Matrix:
        """The continual matrix from the newest ``limit`` evaluation jobs."""
        params = {} if limit is None else {"limit": limit}
        return Matrix.from_json(self._json("GET", "/v1/versions/matrix", params=params))

    def wait_served(self, number: int, timeout: float = 120.0, poll_s: float = 0.2
                    ) -> LiveVersion:
        """Poll until this API process serves version ``number``; WaitTimeoutError after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            live = self.live_version()
            if live.served_version == number:
                return live
            if time.monotonic() > deadline:
                raise WaitTimeoutError(
                    f"{self.url} does not serve version {number} after {timeout:.0f} s (live "
                    f"pointer {live.live_version}, last swap error {live.last_swap_error})")
            time.sleep(poll_s)
