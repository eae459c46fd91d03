"""ArtifactStore: round trips, atomicity, immutability, key validation (local, memory:// and
s3:// on a real S3 endpoint, moto's server)."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest

from infra.artifacts import MANIFEST, ArtifactStore, validate_key
from infra.errors import Conflict, CorruptArtifact, InvalidName, NotFound
from tests.s3_support import MotoS3


@pytest.fixture(params=["local", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """A local store, an fsspec memory:// one, and s3:// on moto's S3 server (a new bucket)."""
    if request.param == "local":
        return ArtifactStore(tmp_path / "artifacts")
    if request.param == "s3":
        moto_s3: MotoS3 = request.getfixturevalue("moto_s3")
        return ArtifactStore(f"{moto_s3.create_bucket(f'b-{uuid.uuid4().hex[:20]}')}/artifacts")
    return ArtifactStore(f"memory://regcl-test-{uuid.uuid4().hex}/artifacts")


def make_dir(root: Path) -> Path:
    (root / "nested").mkdir(parents=True)
    (root / "adapter_config.json").write_text('{"r": 4}')
    (root / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (root / "nested" / "notes.txt").write_text("hello")
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_put_dir_get_dir_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    src = make_dir(tmp_path / "src")
    info = store.put_dir(src, "adapters/polyp")
    assert store.exists("adapters/polyp")
    assert set(info.files) == {"adapter_config.json", "adapter_model.safetensors",
                               "nested/notes.txt"}
    assert info.size_bytes == sum(len(b) for b in read_tree(src).values())
    assert store.info("adapters/polyp") == info
    out = store.get_dir("adapters/polyp", tmp_path / "out")
    assert read_tree(out) == read_tree(src)  # byte for byte, and no manifest leaked
    with pytest.raises(Conflict):
        store.get_dir("adapters/polyp", out)  # never writes into an existing directory


def test_directories_are_immutable(store: ArtifactStore, tmp_path: Path) -> None:
    first = make_dir(tmp_path / "first")
    store.put_dir(first, "versions/v1")
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("different")
    with pytest.raises(Conflict):
        store.put_dir(other, "versions/v1")
    assert read_tree(store.get_dir("versions/v1", tmp_path / "out")) == read_tree(first)


def test_a_put_that_fails_midway_leaves_nothing(store: ArtifactStore, tmp_path: Path) -> None:
    src = make_dir(tmp_path / "src")
    # Sorted after the good files, so the copy fails with part of the directory written.
    (src / "zz_broken").symlink_to(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError):
        store.put_dir(src, "adapters/broken")
    assert not store.exists("adapters/broken")
    assert not store.fs.exists(f"{store._root}/adapters/broken")
    with pytest.raises(NotFound):
        store.get_dir("adapters/broken", tmp_path / "out")
    if store.is_local:
        assert list((Path(store._root) / ".tmp").iterdir()) == []  # staging cleaned up
    # The key is still free for a good upload.
    (src / "zz_broken").unlink()
    store.put_dir(src, "adapters/broken")
    assert store.exists("adapters/broken")


def test_manifest_is_the_commit_point_on_object_stores(tmp_path: Path) -> None:
    """Files under a key without a manifest (a crashed upload) are not an artifact."""
    store = ArtifactStore(f"memory://regcl-test-{uuid.uuid4().hex}")
    store.fs.pipe_file(f"{store._root}/adapters/half/adapter_model.safetensors", b"partial")
    assert not store.exists("adapters/half")
    with pytest.raises(NotFound):
        store.info("adapters/half")
    store.put_dir(make_dir(tmp_path / "src"), "adapters/half")  # leftovers replaced
    assert store.fs.isfile(f"{store._root}/adapters/half/{MANIFEST}")
    assert store.get_dir("adapters/half", tmp_path / "out").joinpath("nested/notes.txt") \
        .read_text() == "hello"


def test_concurrent_puts_of_one_key_store_exactly_one(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    sources = []
    for i in range(4):
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "who").write_text(str(i))
        sources.append(src)
    barrier, outcomes = threading.Barrier(4), []

    def put(src: Path) -> None:
        barrier.wait()
        try:
            store.put_dir(src, "adapters/raced")
            outcomes.append("ok")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=put, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 3 + ["ok"]
    assert store.local_path("adapters/raced").joinpath("who").read_text() in "0123"


def test_corruption_is_detected(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    store.put_dir(make_dir(tmp_path / "src"), "adapters/polyp")
    (store.local_path("adapters/polyp") / "nested" / "notes.txt").write_text("tampered")
    with pytest.raises(CorruptArtifact):
        store.get_dir("adapters/polyp", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bytes(store: ArtifactStore) -> None:
    store.put_bytes("reports/a.json", b'{"x": 1}')
    assert store.exists("reports/a.json")
    assert store.get_bytes("reports/a.json") == b'{"x": 1}'
    with pytest.raises(Conflict):
        store.put_bytes("reports/a.json", b"other")
    assert store.get_bytes("reports/a.json") == b'{"x": 1}'
    store.put_bytes("reports/a.json", b"new", overwrite=True)
    assert store.get_bytes("reports/a.json") == b"new"
    with pytest.raises(NotFound) as info:
        store.get_bytes("reports/missing.json")
    assert isinstance(info.value, KeyError)


def test_delete(store: ArtifactStore, tmp_path: Path) -> None:
    store.put_dir(make_dir(tmp_path / "src"), "adapters/gone")
    store.put_bytes("blob", b"1")
    assert store.delete("adapters/gone") and store.delete("blob")
    assert not store.exists("adapters/gone") and not store.exists("blob")
    assert not store.delete("adapters/gone")
    with pytest.raises(NotFound):
        store.info("adapters/gone")


def test_local_path(tmp_path: Path) -> None:
    local = ArtifactStore(tmp_path / "artifacts")
    local.put_dir(make_dir(tmp_path / "src"), "adapters/polyp")
    assert local.local_path("adapters/polyp") == tmp_path / "artifacts" / "adapters" / "polyp"
    with pytest.raises(NotFound):
        local.local_path("adapters/none")
    assert ArtifactStore(f"memory://regcl-test-{uuid.uuid4().hex}").local_path("x") is None


def test_iter_keys(store: ArtifactStore, tmp_path: Path) -> None:
    src = make_dir(tmp_path / "src")
    store.put_dir(src, "adapters/b")
    store.put_dir(src, "adapters/a")
    assert list(store.iter_keys("adapters")) == ["adapters/a", "adapters/b"]
    assert list(store.iter_keys("nothing")) == []


@pytest.mark.parametrize("key", [
    "", "/abs", "/", "a/../b", "..", "a/./b", "a//b", "a/", ".hidden", "a/.tmp", "a b",
    "a\\b", "ü", "a:b",
])
def test_bad_keys_are_refused(store: ArtifactStore, key: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidName) as info:
        store.put_bytes(key, b"x")
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidName):
        store.exists(key)


def test_good_keys_pass() -> None:
    for key in ("adapters/polyp", "versions/v12/adapter", "a.b_c-D/9"):
        assert validate_key(key) == key
