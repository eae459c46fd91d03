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

A store that cannot be reached (connection refused or reset, a timeout) raises
:class:`~infra.errors.StoreUnavailable`, never a half-done state: each operation is tried
again, with backoff, for up to ``retry_s`` seconds first (0: once; the API answers 503 at once,
workers wait out a short outage), and stops at a caller's deadline (:mod:`infra.store_reach`).
A retried put whose first attempt committed before the connection broke finds its own manifest
and returns it. Existence checks that decide a write or a delete are strict (an unreachable
store is an error, not "absent"). Keys, manifests and local-file helpers:
:mod:`infra.artifact_files`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from infra.artifact_files import (
    KEY_SEGMENT,
    MANIFEST,
    ArtifactInfo,
    check_relative,
    copy_stream,
    files_of,
    fsync_dir,
    out_of_space,
    validate_key,
)
from infra.errors import ConfigError, Conflict, CorruptArtifact, NotFound, is_out_of_space
from infra.store_reach import (
    S3_CONFIG,
    S3_RETRIES,
    call_with_retries,
    check_deadline,
    reaches_store,
)

__all__ = ["MANIFEST", "ArtifactInfo", "ArtifactStore", "files_of", "validate_key"]

logger = logging.getLogger(__name__)

_TMP = ".tmp"
T = TypeVar("T")


class ArtifactStore:
    """Immutable artifacts under ``url``: a local directory or any fsspec URL.

    ``retry_s``: how long an operation is tried again while the store cannot be reached
    before it raises :class:`~infra.errors.StoreUnavailable` (0: tried once). Operations
    run inside :func:`~infra.store_reach.store_deadline` stop at its deadline."""

    def __init__(self, url: str | os.PathLike[str], *, retry_s: float = 0.0) -> None:
        self.url = str(url)
        self.retry_s = max(0.0, float(retry_s))
        options: dict[str, Any] = {"use_listings_cache": False}
        if self.url.startswith(("s3://", "s3a://")):
            options["config_kwargs"] = S3_CONFIG
        try:
            # Other processes write to the same store: a cached listing would hide their puts.
            self.fs, root = url_to_fs(self.url, **options)
        except ImportError as exc:
            raise ConfigError(f"artifact store {self.url!r}: {exc} (for s3:// install "
                              "s3fs: pip install 'regcl[s3]')") from exc
        if hasattr(self.fs, "retries"):
            self.fs.retries = S3_RETRIES
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._root = root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    def _path(self, key: str) -> str:
        return f"{self._root}/{validate_key(key)}"

    def _call(self, what: str, attempt: Callable[[int], T]) -> T:
        return call_with_retries(what, attempt, self.retry_s)

    def _is_file(self, path: str) -> bool:
        """Whether ``path`` is a file; an unreachable store raises (fsspec's ``isfile`` says
        False to any error, which must not decide a write or a delete). On S3 one HEAD."""
        check_deadline()
        try:
            if hasattr(self.fs, "call_s3"):  # fsspec's info would list the prefix after a 404
                bucket, key, _ = self.fs.split_path(path)
                self.fs.call_s3("head_object", Bucket=bucket, Key=key)
                return True
            return self.fs.info(path)["type"] == "file"
        except (FileNotFoundError, NotADirectoryError):
            return False

    def _has_files(self, path: str) -> bool:
        """Whether anything lies under the directory ``path`` (on S3 one listing)."""
        check_deadline()
        try:
            return bool(self.fs.ls(path, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return False

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
        sources = {check_relative(rel): Path(src) for rel, src in files.items()}

        def attempt(number: int) -> ArtifactInfo:
            with out_of_space(key):
                try:
                    if self.is_local:
                        return self._put_files_local(sources, key)
                    return self._put_files_remote(sources, key)
                except Conflict:
                    committed = self._committed_by_us(sources, key) if number > 1 else None
                    if committed is None:
                        raise
                    logger.warning("artifact %s: the attempt cut off by the store's outage had "
                                   "committed it; keeping that", key)
                    return committed

        info = self._call(f"store {key}", attempt)
        logger.info("stored artifact %s (%d files, %d bytes)", key, len(info.files),
                    info.size_bytes)
        return info

    def _committed_by_us(self, sources: dict[str, Path], key: str) -> ArtifactInfo | None:
        """The manifest at ``key`` if it records exactly ``sources``' files and digests."""
        try:
            info = self.info(key)
        except NotFound:
            return None
        if set(info.files) != set(sources):
            return None
        for rel, src in sources.items():
            with open(src, "rb") as fin:
                if hashlib.file_digest(fin, "sha256").hexdigest() != info.files[rel]:
                    return None
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
                    digests[rel], size = copy_stream(fin, fout)
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
            fsync_dir(dest.parent)
            return info
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _put_files_remote(self, sources: dict[str, Path], key: str) -> ArtifactInfo:
        dest = self._path(key)
        manifest = f"{dest}/{MANIFEST}"
        if self._is_file(manifest) or self._is_file(dest):
            raise Conflict(f"artifact {key!r} already exists")
        staging = f"{self._root}/{_TMP}/{uuid.uuid4().hex}"
        try:
            digests, total = {}, 0
            for rel, src in sources.items():  # the slow part: nothing at the key yet
                check_deadline()
                with open(src, "rb") as fin, self.fs.open(f"{staging}/{rel}", "wb") as fout:
                    digests[rel], size = copy_stream(fin, fout)
                total += size
            info = ArtifactInfo(key, digests, total, ArtifactInfo.digest_of(digests))
            self._publish_remote(staging, dest, key, info)
            return info
        finally:
            with contextlib.suppress(Exception):
                self.fs.rm(staging, recursive=True)

    def _publish_remote(self, staging: str, dest: str, key: str, info: ArtifactInfo) -> None:
        """Server-side copies of the staged files under ``dest``, then the manifest."""
        if self._is_file(f"{dest}/{MANIFEST}"):
            raise Conflict(f"artifact {key!r} already exists")
        if self._has_files(dest):
            logger.warning("removing incomplete artifact %s (no manifest) before upload", key)
            self.fs.rm(dest, recursive=True)
        try:
            for rel in info.files:
                check_deadline()
                self.fs.cp_file(f"{staging}/{rel}", f"{dest}/{rel}")
            check_deadline()
            # Commit point; create-only, so of two writers of one key exactly one commits.
            self.fs.pipe_file(f"{dest}/{MANIFEST}", info.to_json().encode(), mode="create")
        except FileExistsError as exc:
            logger.error("artifact %s was committed by another writer meanwhile", key)
            raise Conflict(f"artifact {key!r} already exists") from exc
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(dest, recursive=True)
            raise

    @reaches_store("read a manifest")
    def info(self, key: str) -> ArtifactInfo:
        """The manifest of directory artifact ``key`` (NotFound if it is absent or incomplete)."""
        try:
            return ArtifactInfo.from_json(self.fs.cat_file(f"{self._path(key)}/{MANIFEST}"))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFound(f"artifact {key!r} not found") from exc

    @reaches_store("fetch an artifact")
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
                check_deadline()
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open(f"{src_root}/{rel}", "rb") as fin, open(target, "wb") as fout:
                    digest, _ = copy_stream(fin, fout)  # streamed: a version can be large
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

        def attempt(number: int) -> None:
            try:
                with out_of_space(key):
                    self._put_bytes_once(dest, key, data, overwrite)
            except Conflict:
                # A retry after a PUT whose answer the outage cut off: our bytes are there.
                if number == 1 or self._get_bytes_once(dest, key) != data:
                    raise

        self._call(f"store {key}", attempt)

    def _put_bytes_once(self, dest: str, key: str, data: bytes, overwrite: bool) -> None:
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
            fsync_dir(dest.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def get_bytes(self, key: str) -> bytes:
        """The bytes stored at ``key`` (NotFound if absent or if ``key`` is a directory)."""
        path = self._path(key)
        return self._call(f"read {key}", lambda _: self._get_bytes_once(path, key))

    def _get_bytes_once(self, path: str, key: str) -> bytes:
        try:
            if self.fs.isdir(path):
                raise NotFound(f"artifact {key!r} is a directory, not bytes")
            return self.fs.cat_file(path)
        except FileNotFoundError as exc:
            raise NotFound(f"artifact {key!r} not found") from exc

    @reaches_store("read a size")
    def size(self, key: str) -> int:
        """Bytes of the blob at ``key`` (NotFound if absent or a directory)."""
        path = self._path(key)
        try:
            if not self._is_file(path):
                raise NotFound(f"artifact {key!r} not found")
            return int(self.fs.size(path))
        except FileNotFoundError as exc:
            raise NotFound(f"artifact {key!r} not found") from exc

    # -- common --------------------------------------------------------------------------------

    @reaches_store("look up an artifact")
    def exists(self, key: str) -> bool:
        """True if ``key`` holds a complete directory artifact or a blob."""
        path = self._path(key)
        return self._is_file(path) or self._is_file(f"{path}/{MANIFEST}")

    @reaches_store("delete an artifact")
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
        if self._is_file(path):
            self.fs.rm_file(path)
            return True
        if not self._has_files(path):
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
        yield from self._call(f"list {prefix}", lambda _: self._list_keys(prefix))

    def _list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not self.fs.isdir(base):
            return []
        keys = []
        for entry in sorted(self.fs.ls(base, detail=False)):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if KEY_SEGMENT.fullmatch(name) and self.exists(f"{prefix}/{name}"):
                keys.append(f"{prefix}/{name}")
        return keys

    @reaches_store("remove staging leftovers")
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
