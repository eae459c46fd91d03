"""The artifact store when S3 goes away (issue #24, case 1, the library's part): moto's real S3
server behind the tests' TCP proxy, which refuses connections while "down".

- every operation raises StoreUnavailable (a ConnectionError, mapped to 503 by the API) within
  seconds, never a wrong answer ("absent") and never a hang; nothing is left at the key;
- with ``retry_s`` the store waits out an outage shorter than that and the put completes;
- under a :func:`store_deadline`, a put on a slow store stops before its commit;
- a retried put whose first attempt committed (the answer lost on the way back) keeps that
  commit instead of failing with Conflict; a different content still gets Conflict.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs

from infra.artifacts import MANIFEST, ArtifactStore
from infra.errors import Conflict, StoreUnavailable
from infra.store_reach import store_deadline
from tests.s3_support import MotoS3
from tests.tcp_proxy import TcpProxy

FAIL_WITHIN_S = 5.0  # a refused connection must not take the libraries' minute to surface


@pytest.fixture
def proxy(moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpProxy]:
    """The S3 endpoint as this process sees it: through a proxy the test can take down."""
    with TcpProxy(moto_s3.port) as through:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", through.url)
        s3fs.S3FileSystem.clear_instance_cache()  # instances are cached without the endpoint
        try:
            yield through
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


def _store(moto_s3: MotoS3, retry_s: float = 0.0) -> ArtifactStore:
    bucket = moto_s3.create_bucket(f"fault-{uuid.uuid4().hex[:20]}")
    return ArtifactStore(f"{bucket}/artifacts", retry_s=retry_s)


def _adapter_dir(root: Path, size: int = 64 << 10) -> Path:
    root.mkdir()
    (root / "adapter_config.json").write_text('{"r": 4}')
    (root / "adapter_model.safetensors").write_bytes(os.urandom(size))
    return root


def _direct(store: ArtifactStore, moto_s3: MotoS3) -> list[str]:
    """Every object under the store's root, read past the proxy (as another host would)."""
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3.url},
                           skip_instance_cache=True)
    root = store._root
    return sorted(p[len(root) + 1:] for p in fs.find(root))


def test_every_operation_fails_fast_and_clearly_while_the_store_is_down(
        moto_s3: MotoS3, proxy: TcpProxy, tmp_path: Path) -> None:
    store = _store(moto_s3)
    kept = store.put_dir(_adapter_dir(tmp_path / "a"), "adapters/kept")
    store.put_bytes("blobs/kept", b"kept")
    before = _direct(store, moto_s3)
    proxy.down()
    operations = {
        "put_dir": lambda: store.put_dir(tmp_path / "a", "adapters/new"),
        "put_bytes": lambda: store.put_bytes("blobs/new", b"new"),
        "info": lambda: store.info("adapters/kept"),
        "get_dir": lambda: store.get_dir("adapters/kept", tmp_path / "got"),
        "get_bytes": lambda: store.get_bytes("blobs/kept"),
        "size": lambda: store.size("blobs/kept"),
        "exists": lambda: store.exists("adapters/kept"),
        "delete": lambda: store.delete("adapters/kept"),
        "iter_keys": lambda: list(store.iter_keys("adapters")),
    }
    took = {}
    for name, operation in operations.items():
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="did not answer") as caught:
            operation()
        took[name] = time.monotonic() - start
        assert isinstance(caught.value, ConnectionError), name
        assert took[name] < FAIL_WITHIN_S, (name, took[name])
    print("store down, seconds to StoreUnavailable: "
          + ", ".join(f"{k} {v:.2f}" for k, v in took.items()))
    assert not (tmp_path / "got").exists()
    proxy.up()
    assert _direct(store, moto_s3) == before  # nothing written, nothing deleted
    assert store.info("adapters/kept") == kept
    store.get_dir("adapters/kept", tmp_path / "got")  # digests checked
    assert store.get_bytes("blobs/kept") == b"kept"
    assert not store.exists("adapters/new") and not store.exists("blobs/new")


def test_a_store_with_retry_waits_out_a_short_outage(moto_s3: MotoS3, proxy: TcpProxy,
                                                     tmp_path: Path) -> None:
    store = _store(moto_s3, retry_s=30.0)
    source = _adapter_dir(tmp_path / "a")
    proxy.down()
    threading.Timer(3.0, proxy.up).start()
    start = time.monotonic()
    info = store.put_dir(source, "versions/v1")
    took = time.monotonic() - start
    assert 3.0 <= took < 30.0, took
    store.get_dir("versions/v1", tmp_path / "back")
    assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == \
        (source / "adapter_model.safetensors").read_bytes()
    assert store.info("versions/v1") == info
    print(f"put through a 3 s outage: {took:.1f} s")


def test_a_retried_put_keeps_the_commit_whose_answer_was_lost(
        moto_s3: MotoS3, proxy: TcpProxy, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(moto_s3, retry_s=10.0)
    real_pipe = store.fs.pipe_file
    cut = []

    def commit_then_lose_the_answer(path: str, *args: object, **kwargs: object) -> object:
        result = real_pipe(path, *args, **kwargs)
        if path.endswith(MANIFEST) and not cut:
            cut.append(path)  # the PUT reached S3; its answer did not reach us
            raise ConnectionResetError("connection reset by peer")
        return result

    monkeypatch.setattr(store.fs, "pipe_file", commit_then_lose_the_answer)
    source = _adapter_dir(tmp_path / "a")
    info = store.put_dir(source, "adapters/x")
    assert cut and store.info("adapters/x") == info
    monkeypatch.setattr(store.fs, "pipe_file", real_pipe)
    other = _adapter_dir(tmp_path / "b")
    with pytest.raises(Conflict):
        store.put_dir(other, "adapters/x")  # another content at a taken key: still refused
    with pytest.raises(Conflict):
        store.put_dir(source, "adapters/x")  # and so is a first attempt of the same content


def test_a_put_on_a_slow_store_stops_at_the_deadline_before_its_commit(
        moto_s3: MotoS3, proxy: TcpProxy, tmp_path: Path) -> None:
    store = _store(moto_s3)
    proxy.latency_s = 0.5  # each request: the put needs about 15 of them
    start = time.monotonic()
    with store_deadline(2.0), pytest.raises(StoreUnavailable, match="too slow"):
        store.put_dir(_adapter_dir(tmp_path / "a"), "adapters/late")
    took = time.monotonic() - start
    proxy.latency_s = 0.0
    assert took < 2.0 + 3 * 0.5 + 1.0, took  # past the deadline by about one request
    assert not store.exists("adapters/late")
    assert not [o for o in _direct(store, moto_s3) if o.startswith("adapters/")]
