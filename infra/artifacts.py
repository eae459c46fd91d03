"""Artifact store: immutable directories and blobs under one fsspec URL (local dir by default).

Keys are ``/``-joined segments of ``[A-Za-z0-9._-]`` that do not start with a dot
(``adapters/polyp``, ``versions/v3``); anything else raises :class:`~infra.errors.InvalidName`.

A *directory artifact* is visible only once complete, so a crash never leaves a half-written one
at its key:

- local store: files are copied (and fsynced) into ``<root>/.tmp/<uuid>``, then the whole
  directory is renamed onto the key with ``os.replace`` - one atomic step;
- object stores (``s3://``, ``memory://``, ...), which have no rename: files are uploaded into
  ``<root>/.tmp/<uuid>`` (a writer killed while uploading leaves files there only), then
  copied server-side under the key, and the manifest ``.regcl-manifest.json`` is written
  *last*, with a create-only PUT (``If-None-Match: *`` on S3). The manifest is the commit
  point: readers (:meth:`~ArtifactStore.info`, :meth:`~ArtifactStore.get_dir`,
  :meth:`~ArtifactStore.exists`, :meth:`~ArtifactStore.iter_keys`) see an artifact only once it
  exists, and files under a key without one (a writer killed between the copies and the
  manifest) are removed by the next put of that key. One writer per key at a time is the
  registry's job (per-name locks, unique version numbers); a second one loses at the manifest.

Either way the manifest records each file's SHA-256, and :meth:`ArtifactStore.get_dir` checks them.
Directory artifacts are never overwritten (a second put raises :class:`~infra.errors.Conflict`).

``s3://`` needs s3fs (``pip install 'regcl[s3]'``); credentials, endpoint and region come from
the usual variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3`` for MinIO and other S3-compatible stores, ``AWS_DEFAULT_REGION``),
read by botocore itself. Listings are never cached, so every process sees the others' puts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from infra.errors import (
    ConfigError,
    Conflict,
    CorruptArtifact,
    InsufficientStorage,
    InvalidName,
    NotFound,
    is_out_of_space,
)

__all__ = ["MANIFEST", "ArtifactInfo", "ArtifactStore", "validate_key"]

logger = logging.getLogger(__name__)

MANIFEST = ".regcl-manifest.json"
_TMP = ".tmp"
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_CHUNK = 1 << 20


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid artifact key, else raise InvalidName."""
    if not isinstance(key, str) or not key:
        raise InvalidName(f"artifact key must be a non-empty string, got {key!r}")
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise InvalidName(
                f"invalid artifact key {key!r}: segments must match [A-Za-z0-9._-]+, must not "
                "start with '.', and must not be empty (no absolute paths, no '..')")
    return key


def _check_relative(rel: str) -> str:
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


def _copy_stream(src: BinaryIO, dst: BinaryIO) -> tuple[str, int]:
    """Copy ``src`` to ``dst``; return (sha256 hex, bytes)."""
    h, size = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _out_of_space(key: str) -> Iterator[None]:
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


class ArtifactStore:
    """Immutable artifacts under ``url``: a local directory or any fsspec URL."""

    def __init__(self, url: str | os.PathLike[str]) -> None:
        self.url = str(url)
        try:
            # Other processes write to the same store: a cached listing would hide their puts.
            self.fs, root = url_to_fs(self.url, use_listings_cache=False)
        except ImportError as exc:
            raise ConfigError(f"artifact store {self.url!r}: {exc} (for s3:// install "
                              "s3fs: pip install 'regcl[s3]')") from exc
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._root = root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    def _path(self, key: str) -> str:
        return f"{self._root}/{validate_key(key)}"

    # -- directories ---------------------------------------------------------------------------

    def put_dir(self, local_dir: str | os.PathLike[str], key: str) -> ArtifactInfo:
        """Store the files under ``local_dir`` (recursively) as artifact ``key``, atomically."""
        return self.put_files(files_of(local_dir), key)

    def put_files(self, files: Mapping[str, str | os.PathLike[str]], key: str) -> ArtifactInfo:
        """Store ``{relative path in artifact: local file}`` as directory artifact ``key``.

        Raises Conflict if ``key`` already holds an artifact, InsufficientStorage if the store
        has no room left; on any failure nothing is left at ``key``.
        """
        validate_key(key)
        sources = {_check_relative(rel): Path(src) for rel, src in files.items()}
        with _out_of_space(key):
            if self.is_local:
                info = self._put_files_local(sources, key)
            else:
                info = self._put_files_remote(sources, key)
        logger.info("stored artifact %s (%d files, %d bytes)", key, len(info.files),
                    info.size_bytes)
        return info

    def _tmp_dir(self) -> Path:
        tmp = Path(self._root) / _TMP
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def _put_files_local(self, sources: dict[str, Path], key: str) -> ArtifactInfo:
        dest = Path(self._path(key))
        if dest.exists():
            raise Conflict(f"artifact {key!r} already exists")
        staging = self._tmp_dir() / uuid.uuid4().hex
        try:
            digests, total = {}, 0
            for rel, src in sources.items():
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(src, "rb") as fin, open(target, "wb") as fout:
                    digests[rel], size = _copy_stream(fin, fout)
                    fout.flush()
                    os.fsync(fout.fileno())
                total += size
            info = ArtifactInfo(key, digests, total, ArtifactInfo.digest_of(digests))
            staging.mkdir(parents=True, exist_ok=True)
            (staging / MANIFEST).write_text(info.to_json())
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                # Atomic; fails if dest appeared meanwhile (non-empty dir) or is a file.
                os.replace(staging, dest)
            except OSError as exc:
                if is_out_of_space(exc):
                    raise
                raise Conflict(f"artifact {key!r} already exists") from exc
            _fsync_dir(dest.parent)
            return info
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _put_files_remote(self, sources: dict[str, Path], key: str) -> ArtifactInfo:
        dest = self._path(key)
        manifest = f"{dest}/{MANIFEST}"
        if self.fs.exists(manifest) or self.fs.isfile(dest):
            raise Conflict(f"artifact {key!r} already exists")
        staging = f"{self._root}/{_TMP}/{uuid.uuid4().hex}"
        try:
            digests, total = {}, 0
            for rel, src in sources.items():  # the slow part: nothing at the key yet
                with open(src, "rb") as fin, self.fs.open(f"{staging}/{rel}", "wb") as fout:
                    digests[rel], size = _copy_stream(fin, fout)
                total += size
            info = ArtifactInfo(key, digests, total, ArtifactInfo.digest_of(digests))
            self._publish_remote(staging, dest, key, info)
            return info
        finally:
            with contextlib.suppress(Exception):
                self.fs.rm(staging, recursive=True)

    def _publish_remote(self, staging: str, dest: str, key: str, info: ArtifactInfo) -> None:
        """Server-side copies of the staged files under ``dest``, then the manifest."""
        if self.fs.exists(f"{dest}/{MANIFEST}"):
            raise Conflict(f"artifact {key!r} already exists")
        if self.fs.exists(dest):
            logger.warning("removing incomplete artifact %s (no manifest) before upload", key)
            self.fs.rm(dest, recursive=True)
        try:
            for rel in info.files:
                self.fs.copy(f"{staging}/{rel}", f"{dest}/{rel}")
            # Commit point; create-only, so of two writers of one key exactly one commits.
            self.fs.pipe_file(f"{dest}/{MANIFEST}", info.to_json().encode(), mode="create")
        except FileExistsError as exc:
            logger.error("artifact %s was committed by another writer meanwhile", key)
            raise Conflict(f"artifact {key!r} already exists") from exc
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(dest, recursive=True)
            raise

    def info(self, key: str) -> ArtifactInfo:
        """The manifest of directory artifact ``key`` (NotFound if it is absent or incomplete)."""
        try:
            with self.fs.open(f"{self._path(key)}/{MANIFEST}", "rb") as f:
                return ArtifactInfo.from_json(f.read())
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFound(f"artifact {key!r} not found") from exc

    def get_dir(self, key: str, dest: str | os.PathLike[str]) -> Path:
        """Copy directory artifact ``key`` to the new local directory ``dest``, atomically.

        ``dest`` must not exist yet (Conflict); every file is checked against its digest
        (CorruptArtifact). Returns ``dest``.
        """
        info = self.info(key)
        dest = Path(dest)
        if dest.exists():
            raise Conflict(f"destination {dest} already exists")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex}"
        src_root = self._path(key)
        try:
            for rel, expected in info.files.items():
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open(f"{src_root}/{rel}", "rb") as fin, open(target, "wb") as fout:
                    digest, _ = _copy_stream(fin, fout)
                if digest != expected:
                    raise CorruptArtifact(f"artifact {key!r}: {rel} has sha256 {digest}, "
                                          f"the manifest says {expected}")
            staging.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(staging, dest)
            except OSError as exc:
                raise Conflict(f"destination {dest} appeared while copying") from exc
            return dest
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- blobs ---------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        """Store ``data`` at ``key`` atomically (readers see the old or the new bytes, never
        a part). Without ``overwrite`` an existing key raises Conflict; no room left,
        InsufficientStorage (and nothing at ``key``)."""
        dest = self._path(key)
        with _out_of_space(key):
            if self.is_local:
                self._put_bytes_local(Path(dest), key, data, overwrite)
                return
            if self.fs.isdir(dest) or (not overwrite and self.fs.exists(dest)):
                raise Conflict(f"artifact {key!r} already exists")
            try:  # one PUT: readers see the old or the new object, never a part
                self.fs.pipe_file(dest, data, mode="overwrite" if overwrite else "create")
            except FileExistsError as exc:
                raise Conflict(f"artifact {key!r} already exists") from exc

    def _put_bytes_local(self, dest: Path, key: str, data: bytes, overwrite: bool) -> None:
        tmp = self._tmp_dir() / uuid.uuid4().hex
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                if overwrite:
                    if dest.is_dir():
                        raise IsADirectoryError(dest)
                    os.replace(tmp, dest)
                else:
                    os.link(tmp, dest)  # atomic create-if-absent
            except OSError as exc:
                if is_out_of_space(exc):
                    raise
                raise Conflict(f"artifact {key!r} already exists") from exc
            _fsync_dir(dest.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def get_bytes(self, key: str) -> bytes:
        """The bytes stored at ``key`` (NotFound if absent or if ``key`` is a directory)."""
        path = self._path(key)
        try:
            if self.fs.isdir(path):
                raise NotFound(f"artifact {key!r} is a directory, not bytes")
            return self.fs.cat_file(path)
        except FileNotFoundError as exc:
            raise NotFound(f"artifact {key!r} not found") from exc

    def size(self, key: str) -> int:
        """Bytes of the blob at ``key`` (NotFound if absent or a directory)."""
        path = self._path(key)
        try:
            if not self.fs.isfile(path):
                raise NotFound(f"artifact {key!r} not found")
            return int(self.fs.size(path))
        except FileNotFoundError as exc:
            raise NotFound(f"artifact {key!r} not found") from exc

    # -- common --------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """True if ``key`` holds a complete directory artifact or a blob."""
        path = self._path(key)
        return self.fs.isfile(path) or self.fs.isfile(f"{path}/{MANIFEST}")

    def delete(self, key: str) -> bool:
        """Remove artifact ``key``; False if there was none. A directory disappears at once
        (renamed away locally, manifest removed first elsewhere), then its files are removed."""
        path = self._path(key)
        if self.is_local:
            local = Path(path)
            if local.is_file():
                local.unlink()
                return True
            if not local.is_dir():
                return False
            trash = self._tmp_dir() / f"trash-{uuid.uuid4().hex}"
            os.replace(local, trash)
            shutil.rmtree(trash, ignore_errors=True)
            return True
        if self.fs.isfile(path):
            self.fs.rm_file(path)
            return True
        if not self.fs.exists(path):
            return False
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(f"{path}/{MANIFEST}")
        self.fs.rm(path, recursive=True)
        return True

    def local_path(self, key: str) -> Path | None:
        """Where artifact ``key`` lies on this machine (read it in place; never write to it),
        or None when the store is not local. NotFound if there is no such artifact."""
        if not self.is_local:
            return None
        if not self.exists(key):
            raise NotFound(f"artifact {key!r} not found")
        return Path(self._path(key))

    def iter_keys(self, prefix: str) -> Iterator[str]:
        """Keys of the directory artifacts directly under ``prefix`` (e.g. ``adapters``)."""
        base = self._path(prefix)
        if not self.fs.isdir(base):
            return
        for entry in sorted(self.fs.ls(base, detail=False)):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if _SEGMENT.fullmatch(name) and self.exists(f"{prefix}/{name}"):
                yield f"{prefix}/{name}"

    def cleanup_temp(self, older_than_s: float = 24 * 3600) -> int:
        """Remove staging leftovers of crashed puts older than ``older_than_s`` (an object
        store's by their newest file); how many staging entries were removed."""
        if not self.is_local:
            return self._cleanup_temp_remote(older_than_s)
        tmp = Path(self._root) / _TMP
        if not tmp.is_dir():
            return 0
        removed, cutoff = 0, time.time() - older_than_s
        for entry in tmp.iterdir():
            if entry.lstat().st_mtime < cutoff:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
        return removed

    def _cleanup_temp_remote(self, older_than_s: float) -> int:
        tmp = f"{self._root}/{_TMP}"
        if not self.fs.isdir(tmp):
            return 0
        newest: dict[str, float] = {}
        for path in self.fs.find(tmp):
            entry = path.rstrip("/")[len(tmp) + 1:].split("/", 1)[0]
            newest[entry] = max(newest.get(entry, 0.0), self.fs.modified(path).timestamp())
        cutoff = time.time() - older_than_s
        stale = [entry for entry, mtime in newest.items() if mtime < cutoff]
        for entry in stale:
            self.fs.rm(f"{tmp}/{entry}", recursive=True)
        return len(stale)
