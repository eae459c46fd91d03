"""Task images, fetched from the configured Label Studio and the storage hosts it sends to.

A task names its image by URL:

- relative to Label Studio (``/data/upload/3/x.png``, ``/data/local-files/?d=...``,
  ``/tasks/7/resolve/?fileuri=...``) or absolute inside its origin: resolved against
  ``REGCL_LABEL_STUDIO_URL``; anything outside that origin is refused before a request is
  made (:meth:`service.labelstudio.origin.Origin.resolve`: scheme, host, port, no ``user@``,
  base path);
- a cloud-storage URI (``s3://``, ``gs://``, ``azure-blob://``, what S3 / GCS / Azure import
  storage puts in tasks): asked of Label Studio's presign endpoint,
  ``/tasks/<task id>/presign/?fileuri=<base64url of the URI>``, which answers with the bytes
  (presign off: Label Studio proxies the storage) or a 303 to a presigned URL on the storage
  host (presign on, the default).

Requests to Label Studio carry the API token (:mod:`.connection`, :mod:`.auth`). Redirects are
followed by hand, at most :data:`MAX_REDIRECTS`: inside the origin with the token; anywhere
else only to a storage host ``REGCL_LABEL_STUDIO_STORAGE_HOSTS`` lists, at an address it may
reach (:mod:`.storage_hosts`), without the token or any cookie, and from there only to listed
storage hosts again. The body is read as a stream and cut off past
``label_studio_max_image_bytes``, the whole fetch past ``label_studio_fetch_timeout_s``; then it
is decoded with the upload checks (pixel limit, formats) and stored in the engine's image store,
which keys images by a digest of their pixels. Each URL remembers its image id, so an image is
fetched once while the engine still holds it, and encoded once per adapter version (the engine's
embedding cache).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import httpx

from infra.settings import Settings
from regcl.data.images import decode_image_bytes
from regcl.errors import DataError
from service.engine.errors import InvalidImageError
from service.engine.segmentation import SegmentationEngine
from service.labelstudio.connection import LabelStudioConnection, shown
from service.labelstudio.errors import (
    ForeignImageUrlError,
    ImageTooLargeError,
    ImageUnavailableError,
    LabelStudioUnreachableError,
    MalformedPayloadError,
)

__all__ = ["CLOUD_SCHEMES", "MAX_REDIRECTS", "TaskImage", "TaskImages"]

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 3
MAX_REMEMBERED_URLS = 4096
CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://")
"""Task URIs of Label Studio's cloud import storages, resolved through its presign endpoint."""


@dataclass(frozen=True)
class TaskImage:
    """An image in the engine's store: its id (pixel digest) and size."""

    image_id: str
    width: int
    height: int


class TaskImages:
    """Fetches task images from Label Studio into ``engine`` (see the module doc)."""

    def __init__(self, settings: Settings, engine: SegmentationEngine,
                 connection: LabelStudioConnection) -> None:
        self.connection = connection
        self.max_bytes = settings.label_studio_max_image_bytes
        self.timeout_s = settings.label_studio_fetch_timeout_s
        self.max_pixels = settings.max_image_pixels
        self.engine = engine
        self._known: OrderedDict[str, TaskImage] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, url: object, task_id: int | None = None) -> str:
        """``url`` as an absolute URL inside the Label Studio origin (a cloud URI: its presign
        endpoint for ``task_id``), else the error."""
        origin = self.connection.require_origin()
        if not isinstance(url, str) or not url:
            raise ImageUnavailableError("the task names no image URL")
        if url.startswith(CLOUD_SCHEMES):
            if task_id is None:
                raise MalformedPayloadError(f"image {shown(url)} is in cloud storage: Label "
                                            "Studio resolves it per task, and the task has no id")
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()
            return f"{origin.url}/tasks/{task_id}/presign/?fileuri={fileuri}"
        resolved = origin.resolve(url)
        if resolved is None:
            raise ForeignImageUrlError(f"image URL {shown(url)} is outside Label Studio "
                                       f"({origin.url}); refused")
        return resolved

    def key_of(self, url: object, task_id: int | None = None) -> str:
        """What names a task's image across calls: a cloud URI itself, else the resolved
        URL (checked as :meth:`resolve` does)."""
        resolved = self.resolve(url, task_id)
        return url if isinstance(url, str) and url.startswith(CLOUD_SCHEMES) else resolved

    def remembered(self, key: str) -> TaskImage | None:
        """The image fetched for ``key`` (:meth:`key_of`) while the engine still holds it."""
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                self._known.move_to_end(key)
        return known if known is not None and known.image_id in self.engine.images else None

    def get(self, url: object, task_id: int | None = None) -> TaskImage:
        """The image of a task (``task_id``: needed for cloud URIs): from memory when the
        engine still holds it, else fetched, decoded and stored."""
        resolved = self.resolve(url, task_id)
        key = url if isinstance(url, str) and url.startswith(CLOUD_SCHEMES) else resolved
        known = self.remembered(key)
        if known is not None:
            return known
        data = self._fetch(resolved)
        try:
            image = decode_image_bytes(data, self.max_pixels)
        except DataError as exc:
            raise InvalidImageError(f"the image at {shown(resolved)}: {exc}") from exc
        found = TaskImage(self.engine.images.register(image), int(image.shape[1]),
                          int(image.shape[0]))
        with self._lock:
            self._known[key] = found
            while len(self._known) > MAX_REMEMBERED_URLS:
                self._known.popitem(last=False)
        return found

    def _fetch(self, url: str) -> bytes:
        """GET ``url`` (inside the origin), redirects checked hop by hop, bounded in bytes
        and seconds."""
        deadline = time.monotonic() + self.timeout_s
        in_origin = True
        for _ in range(MAX_REDIRECTS + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            where = "Label Studio" if in_origin else "the storage host"
            try:
                with (self.connection.origin_get(url, remaining) if in_origin else
                      self.connection.storage_get(url, remaining)) as resp:
                    if resp.is_redirect:
                        url, in_origin = self._redirect(url, resp.headers.get("location", ""),
                                                        in_origin)
                        continue
                    self._check_status(url, resp.status_code, where)
                    return self._read(url, resp, deadline)
            except httpx.TimeoutException:
                break
            except httpx.ProtocolError as exc:  # e.g. a Location header that is no URL
                raise LabelStudioUnreachableError(
                    f"{where}'s answer for {shown(url)} is not valid HTTP: "
                    f"{type(exc).__name__}") from None
            except httpx.TransportError as exc:
                raise LabelStudioUnreachableError(
                    f"{where} did not answer for {shown(url)}: {type(exc).__name__}") from None
        else:
            raise ImageUnavailableError(f"more than {MAX_REDIRECTS} redirects for "
                                        f"{shown(url)}")
        raise LabelStudioUnreachableError(f"fetching {shown(url)} took longer than "
                                          f"{self.timeout_s:g} s")

    def _redirect(self, url: str, location: str, in_origin: bool) -> tuple[str, bool]:
        """The next hop and whether it is inside the origin: a hop from the origin may stay
        in it, or go to a listed storage host; a hop from a storage host goes to a listed
        storage host only."""
        try:
            target = str(httpx.URL(url).join(location))
        except (httpx.InvalidURL, ValueError, TypeError):  # a Location that is no URL
            raise ForeignImageUrlError(f"a redirect for {shown(url)} names no URL; "
                                       "refused") from None
        origin = self.connection.require_origin()
        if in_origin and origin.resolve(target) is not None:
            return origin.resolve(target) or target, True
        if not target.startswith(("http://", "https://")):
            raise ForeignImageUrlError(f"a redirect for {shown(url)} leads to "
                                       f"{shown(target)}, which is no http(s) URL; refused")
        self.connection.storage.entry_for(target)  # listed, else the error naming the host
        return target, False

    @staticmethod
    def _check_status(url: str, status: int, where: str) -> None:
        if status >= 500:
            raise LabelStudioUnreachableError(f"{where} answered {status} for {shown(url)}")
        if status != 200:
            raise ImageUnavailableError(f"{where} answered {status} for {shown(url)}")

    def _read(self, url: str, resp: httpx.Response, deadline: float) -> bytes:
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageTooLargeError(f"the image at {shown(url)} has {declared} bytes; at "
                                     f"most {self.max_bytes} are accepted")
        body = bytearray()
        for chunk in resp.iter_raw():
            body += chunk
            if len(body) > self.max_bytes:
                raise ImageTooLargeError(f"the image at {shown(url)} is larger than "
                                         f"{self.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("deadline")
        return bytes(body)
