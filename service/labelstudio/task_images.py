"""Task images, fetched from the configured Label Studio and nowhere else.

A task names its image by URL, usually relative to Label Studio (``/data/upload/3/x.png``,
``/data/local-files/?d=...``). :class:`TaskImages` resolves it against
``REGCL_LABEL_STUDIO_URL`` and refuses any URL outside that origin before a request is made
(:meth:`service.labelstudio.origin.Origin.resolve`: scheme, host, port, no ``user@``, base path).
Redirects are followed by hand, each checked the same way (at most :data:`MAX_REDIRECTS`).
The body is read as a stream and cut off past ``label_studio_max_image_bytes``, and the whole
fetch past ``label_studio_fetch_timeout_s``; then it is decoded with the upload checks
(pixel limit, formats) and stored in the engine's image store, which keys images by a digest
of their pixels. Each URL remembers its image id, so an image is fetched once while the
engine still holds it, and encoded once per adapter version (the engine's embedding cache).

The API key goes only to that origin, as ``Authorization: Token <key>`` (Label Studio's
legacy API token).
"""

from __future__ import annotations

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
from service.labelstudio.errors import (
    ForeignImageUrlError,
    ImageTooLargeError,
    ImageUnavailableError,
    LabelStudioNotConfiguredError,
    LabelStudioUnreachableError,
)
from service.labelstudio.origin import Origin, label_studio_origin

__all__ = ["MAX_REDIRECTS", "TaskImage", "TaskImages"]

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 3
MAX_REMEMBERED_URLS = 4096


@dataclass(frozen=True)
class TaskImage:
    """An image in the engine's store: its id (pixel digest) and size."""

    image_id: str
    width: int
    height: int


class TaskImages:
    """Fetches task images from Label Studio into ``engine`` (see the module doc)."""

    def __init__(self, settings: Settings, engine: SegmentationEngine,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.origin: Origin | None = label_studio_origin(settings.label_studio_url)
        self.max_bytes = settings.label_studio_max_image_bytes
        self.timeout_s = settings.label_studio_fetch_timeout_s
        self.max_pixels = settings.max_image_pixels
        self.engine = engine
        key = settings.label_studio_api_key.get_secret_value()
        headers = {"Accept-Encoding": "identity"}
        if key:
            headers["Authorization"] = f"Token {key}"
        self._client = httpx.Client(headers=headers, follow_redirects=False,
                                    transport=transport, trust_env=False)
        self._known: OrderedDict[str, TaskImage] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    def resolve(self, url: object) -> str:
        """``url`` as an absolute URL inside the Label Studio origin, else the error."""
        if self.origin is None:
            raise LabelStudioNotConfiguredError(
                "REGCL_LABEL_STUDIO_URL is not set: this service fetches task images from "
                "that Label Studio only")
        if not isinstance(url, str) or not url:
            raise ImageUnavailableError("the task names no image URL")
        resolved = self.origin.resolve(url)
        if resolved is None:
            raise ForeignImageUrlError(f"image URL {_shown(url)} is outside Label Studio "
                                       f"({self.origin.url}); refused")
        return resolved

    def get(self, url: object) -> TaskImage:
        """The task image at ``url``: from memory when the engine still holds it, else
        fetched, decoded and stored."""
        resolved = self.resolve(url)
        with self._lock:
            known = self._known.get(resolved)
            if known is not None:
                self._known.move_to_end(resolved)
        if known is not None and known.image_id in self.engine.images:
            return known
        data = self._fetch(resolved)
        try:
            image = decode_image_bytes(data, self.max_pixels)
        except DataError as exc:
            raise InvalidImageError(f"the image at {_shown(resolved)}: {exc}") from exc
        found = TaskImage(self.engine.images.register(image), int(image.shape[1]),
                          int(image.shape[0]))
        with self._lock:
            self._known[resolved] = found
            while len(self._known) > MAX_REMEMBERED_URLS:
                self._known.popitem(last=False)
        return found

    def _fetch(self, url: str) -> bytes:
        """GET ``url`` (inside the origin), redirects checked hop by hop, bounded in bytes
        and seconds."""
        deadline = time.monotonic() + self.timeout_s
        for _ in range(MAX_REDIRECTS + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                with self._client.stream("GET", url, timeout=httpx.Timeout(remaining)) as resp:
                    if resp.is_redirect:
                        url = self._redirect(url, resp.headers.get("location", ""))
                        continue
                    self._check_status(url, resp.status_code)
                    return self._read(url, resp, deadline)
            except httpx.TimeoutException:
                break
            except httpx.ProtocolError as exc:  # e.g. a Location header that is no URL
                raise LabelStudioUnreachableError(
                    f"Label Studio's answer for {_shown(url)} is not valid HTTP: "
                    f"{type(exc).__name__}") from None
            except httpx.TransportError as exc:
                raise LabelStudioUnreachableError(
                    f"Label Studio did not answer for {_shown(url)}: "
                    f"{type(exc).__name__}") from None
        else:
            raise ImageUnavailableError(f"more than {MAX_REDIRECTS} redirects for "
                                        f"{_shown(url)}")
        raise LabelStudioUnreachableError(f"fetching {_shown(url)} took longer than "
                                          f"{self.timeout_s:g} s")

    def _redirect(self, url: str, location: str) -> str:
        assert self.origin is not None
        try:
            target = self.origin.resolve(str(httpx.URL(url).join(location)))
        except (httpx.InvalidURL, ValueError, TypeError):  # a Location that is no URL
            target = None
        if target is None:
            raise ForeignImageUrlError(f"Label Studio redirected {_shown(url)} outside its "
                                       "origin; refused")
        return target

    @staticmethod
    def _check_status(url: str, status: int) -> None:
        if status >= 500:
            raise LabelStudioUnreachableError(f"Label Studio answered {status} for "
                                              f"{_shown(url)}")
        if status != 200:
            raise ImageUnavailableError(f"Label Studio answered {status} for {_shown(url)} "
                                        "(is REGCL_LABEL_STUDIO_API_KEY set?)"
                                        if status in (401, 403) else
                                        f"Label Studio answered {status} for {_shown(url)}")

    def _read(self, url: str, resp: httpx.Response, deadline: float) -> bytes:
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageTooLargeError(f"the image at {_shown(url)} has {declared} bytes; at "
                                     f"most {self.max_bytes} are accepted")
        body = bytearray()
        for chunk in resp.iter_raw():
            body += chunk
            if len(body) > self.max_bytes:
                raise ImageTooLargeError(f"the image at {_shown(url)} is larger than "
                                         f"{self.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("deadline")
        return bytes(body)


def _shown(url: str) -> str:
    """A URL for an error message: at most 200 characters, no query (it may hold a path)."""
    text = url.split("?", 1)[0]
    return repr(text if len(text) <= 200 else text[:200] + "...")
