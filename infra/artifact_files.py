"""What an artifact is made of, apart from where it is stored: keys, the manifest
(:class:`ArtifactInfo`: each file's SHA-256 and one digest over them), and the local-file helpers
of :mod:`infra.artifacts` (streamed copies with their digest, fsync, a full disk named)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from infra.errors import InsufficientStorage, InvalidName, NotFound, is_out_of_space

__all__ = ["KEY_SEGMENT", "MANIFEST", "ArtifactInfo", "check_relative", "copy_stream",
           "files_of", "fsync_dir", "out_of_space", "validate_key"]

MANIFEST = ".regcl-manifest.json"
KEY_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_CHUNK = 1 << 20


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid artifact key, else raise InvalidName."""
    if not isinstance(key, str) or not key:
        raise InvalidName(f"artifact key must be a non-empty string, got {key!r}")
    for segment in key.split("/"):
        if not KEY_SEGMENT.fullmatch(segment):
            raise InvalidName(
                f"invalid artifact key {key!r}: segments must match [A-Za-z0-9._-]+, must not "
                "start with '.', and must not be empty (no absolute paths, no '..')")
    return key


def check_relative(rel: str) -> str:
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or any(p in ("", ".", "..") for p in rel.split("/")) \
            or rel == MANIFEST:
        raise InvalidName(f"invalid file name inside an artifact: {rel!r}")
    return path.as_posix()


@dataclass(frozen=True)
class ArtifactInfo:
    """What a directory artifact holds: file → SHA-256, total size, and one overall digest."""

    key: str
    files: Mapping[str, str]
    size_bytes: int
    sha256: str

    @staticmethod
    def digest_of(files: Mapping[str, str]) -> str:
        """One digest over all (relative path, file digest) pairs."""
        h = hashlib.sha256()
        for rel in sorted(files):
            h.update(f"{rel}\0{files[rel]}\n".encode())
        return h.hexdigest()

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "files": dict(self.files),
                           "size_bytes": self.size_bytes, "sha256": self.sha256}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ArtifactInfo:
        raw = json.loads(text)
        return cls(raw["key"], dict(raw["files"]), int(raw["size_bytes"]), raw["sha256"])


def copy_stream(src: BinaryIO, dst: BinaryIO) -> tuple[str, int]:
    """Copy ``src`` to ``dst``; return (sha256 hex, bytes)."""
    h, size = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def out_of_space(key: str) -> Iterator[None]:
    """A write refused for want of space, as InsufficientStorage naming ``key``."""
    try:
        yield
    except OSError as exc:
        if is_out_of_space(exc):
            raise InsufficientStorage(f"no space left in the artifact store to write "
                                      f"{key!r}: {exc.strerror}") from exc
        raise


def files_of(local_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Every file under ``local_dir`` (recursively) as relative POSIX path → absolute path."""
    root = Path(local_dir)
    if not root.is_dir():
        raise NotFound(f"directory not found: {root}")
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if not p.is_dir()}
