"""Untrusted uploads: bounded reads, base64, and safe extraction of dataset archives.

Size limits: the whole request body is capped by :class:`BodyLimitMiddleware` (a little above
``max_upload_bytes``, so that a base64 upload of the largest file fits); each decoded file is
then held to ``max_upload_bytes`` by the functions here. Both answer 413 ``payload-too-large``.

Archives (:func:`extract_zip`) are checked entry by entry before anything is written: no
absolute paths, ``..``, backslashes, drive letters or symbolic links (zip slip); only image,
mask and JSON files; at most ``max_files`` entries and ``max_bytes`` unpacked, with a cap on the
compression ratio (zip bombs). The sizes an archive declares are not trusted: extraction
stops as soon as more bytes come out than were declared.
"""

from __future__ import annotations

import base64
import binascii
import json
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infra.errors import InsufficientStorage, NotFound, is_out_of_space
from service.api.errors import (
    InvalidArchiveError,
    InvalidBase64Error,
    InvalidJsonFieldError,
    PayloadTooLargeError,
    UnsafeFileError,
)
from service.api.problems import problem_response, service_error_kind

__all__ = [
    "ARCHIVE_SUFFIXES",
    "BodyLimitMiddleware",
    "copy_bounded",
    "decode_base64",
    "extract_zip",
    "form_json_object",
    "name_taken",
    "read_bounded",
    "single_root",
]

_CHUNK = 1 << 20
ARCHIVE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp",
                              ".json"})
"""File types a dataset archive may hold (images, masks and COCO annotations)."""
_JUNK = ("__MACOSX/",)  # macOS resource forks: skipped, not refused
_JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db"})
MAX_COMPRESSION_RATIO = 200


class RequestTooLarge(HTTPException):
    """The request body grew past the limit while it was read (answered as a 413 problem)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Caps every request body at ``max_bytes``: a declared ``Content-Length`` above it is
    answered at once, without reading; a body that grows past it while read (chunked uploads)
    raises :class:`RequestTooLarge` into the route that reads it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    response = problem_response(
                        None, service_error_kind(PayloadTooLargeError),
                        f"the request body exceeds the limit of {self.max_bytes} bytes",
                        instance=scope.get("path", ""), headers={"Connection": "close"})
                    await response(scope, receive, send)
                    return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        await self.app(scope, receive_limited, send)


def _too_large(what: str, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"{what} exceeds the limit of {limit} bytes")


def read_bounded(stream: BinaryIO, limit: int, what: str) -> bytes:
    """All of ``stream``, or 413 if it holds more than ``limit`` bytes."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise _too_large(what, limit)
    return data


def copy_bounded(stream: BinaryIO, dest: Path, limit: int, what: str) -> int:
    """Copy ``stream`` into file ``dest``; 413 past ``limit`` bytes. Returns the size."""
    size = 0
    with open(dest, "wb") as out:
        while chunk := stream.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise _too_large(what, limit)
            out.write(chunk)
    return size


def decode_base64(text: str, limit: int, what: str) -> bytes:
    """Decode standard base64 (padding required, whitespace refused); 413 past ``limit``
    decoded bytes, 422 ``invalid-base64`` if it is not base64."""
    if len(text) // 4 * 3 > limit + 2:
        raise _too_large(what, limit)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidBase64Error(f"{what} is not valid base64: {exc}") from exc
    if len(data) > limit:
        raise _too_large(what, limit)
    return data


def form_json_object(text: str | None, what: str) -> dict[str, Any]:
    """A form field holding a JSON object (empty: ``{}``); InvalidJsonFieldError (422)
    otherwise."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidJsonFieldError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidJsonFieldError(f"{what} must be a JSON object")
    return value


def name_taken(lookup: Callable[[], object]) -> bool:
    """Whether ``lookup()`` finds a record (NotFound: it does not). Upload routes ask before
    reading an upload; the registry asks again, atomically, when it stores it."""
    try:
        lookup()
    except NotFound:
        return False
    return True


def _safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path an archive entry may be written to; None to skip it; refuses the
    rest with 422 ``unsafe-file``."""
    if "\\" in name or "\0" in name:
        raise UnsafeFileError(f"archive entry {name!r}: backslashes and NUL are "
                              "not allowed in paths")
    path = PurePosixPath(name)
    parts = path.parts
    if path.is_absolute() or not parts or any(p in ("..", ".") for p in parts) \
            or ":" in parts[0]:
        raise UnsafeFileError(f"archive entry {name!r} points outside the archive")
    if name.startswith(_JUNK) or parts[-1] in _JUNK_NAMES:
        return None
    if any(p.startswith(".") for p in parts):
        raise UnsafeFileError(f"archive entry {name!r}: hidden files are not "
                              "allowed")
    if path.suffix.lower() not in ARCHIVE_SUFFIXES:
        raise UnsafeFileError(f"archive entry {name!r}: only images "
                              f"({', '.join(sorted(ARCHIVE_SUFFIXES - {'.json'}))}) and .json "
                              "files are allowed in a dataset")
    return path


def extract_zip(archive: Path, dest: Path, *, max_files: int, max_bytes: int) -> int:
    """Extract the zip file ``archive`` into the empty directory ``dest`` under the module's
    rules; returns the number of files written. Refusals are 413 (too big) or 422."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidArchiveError(f"not a readable zip file: {exc}") from exc
    with zf:
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        declared = 0
        for info in zf.infolist():
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeFileError(f"archive entry {info.filename!r} is a "
                                      "symbolic link")
            if info.is_dir():
                _safe_member_path(info.filename.rstrip("/") + "/x.json")  # check the path only
                continue
            if info.flag_bits & 0x1:
                raise InvalidArchiveError(f"{info.filename!r} is encrypted")
            path = _safe_member_path(info.filename)
            if path is None:
                continue
            declared += info.file_size
            if len(plan) >= max_files:
                raise PayloadTooLargeError(f"the archive holds more than "
                                           f"{max_files} files")
            if declared > max_bytes:
                raise PayloadTooLargeError(f"the archive unpacks to more than "
                                           f"{max_bytes} bytes")
            if info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1) \
                    and info.file_size > _CHUNK:
                raise PayloadTooLargeError(f"{info.filename!r} is compressed more than "
                                           f"{MAX_COMPRESSION_RATIO}:1 (possible zip bomb)")
            plan.append((info, path))
        if not plan:
            raise InvalidArchiveError("the archive holds no image or JSON files")
        seen: set[str] = set()
        root = dest.resolve()
        for info, path in plan:
            key = path.as_posix().lower()
            if key in seen:
                raise InvalidArchiveError(f"{info.filename!r} appears twice")
            seen.add(key)
            target = root.joinpath(*path.parts)
            if not target.resolve().is_relative_to(root):  # belt and braces
                raise UnsafeFileError(f"{info.filename!r} points outside")
            target.parent.mkdir(parents=True, exist_ok=True)
            _extract_member(zf, info, target)
    return len(plan)


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    written = 0
    try:
        with zf.open(info) as src, open(target, "xb") as out:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > info.file_size:  # the header lied about the size
                    raise PayloadTooLargeError(f"{info.filename!r} unpacks to "
                                               "more than its declared size")
                out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError,
            NotImplementedError) as exc:
        if is_out_of_space(exc):
            raise InsufficientStorage(f"no space left to unpack {info.filename!r}") from exc
        raise InvalidArchiveError(f"cannot extract {info.filename!r}: "
                                  f"{exc}") from exc


def single_root(directory: Path) -> Path:
    """``directory``, or its only subdirectory when that is all it holds (archives made by
    zipping a folder put everything under the folder's name)."""
    entries = list(directory.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return directory

