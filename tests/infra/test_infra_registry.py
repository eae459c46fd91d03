"""Registry against a real Redis and a local artifact store."""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path

import pytest
import redis

from infra import keys, registry
from infra.artifacts import ArtifactStore
from infra.errors import ConfigError, Conflict, InvalidName, LockTimeout, NotFound
from infra.redis_client import connect
from infra.redis_server import RedisServer
from infra.registry import Registry


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def reg(redis_client: redis.Redis, store: ArtifactStore) -> Registry:
    return Registry(redis_client, store)


def make_adapter(root: Path, domain: str = "polyp", stats: bool = True) -> Path:
    """An adapter directory in regcl's layout (contents are opaque to the registry)."""
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (root / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    if stats:
        (root / "regcl_stats.safetensors").write_bytes(os.urandom(1024))
    (root / "regcl_adapter.json").write_text(json.dumps({"domain": domain}))
    return root


def make_state(path: Path, payload: bytes | None = None) -> Path:
    path.write_bytes(payload if payload is not None else os.urandom(512))
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_add_get_list_delete(reg: Registry, store: ArtifactStore, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "polyp")
    record = reg.add_adapter("polyp", src, {"domain": "polyp", "dice": 0.8})
    assert record.artifact_key == "adapters/polyp" and record.has_stats
    assert record.metadata == {"domain": "polyp", "dice": 0.8}
    assert set(record.files) == set(tree(src))
    assert reg.get_adapter("polyp") == record
    reg.add_adapter("camo", make_adapter(tmp_path / "camo", "camo", stats=False))
    assert [a.name for a in reg.list_adapters()] == ["camo", "polyp"]
    assert not reg.get_adapter("camo").has_stats

    with pytest.raises(Conflict):
        reg.add_adapter("polyp", make_adapter(tmp_path / "other"))
    assert reg.get_adapter("polyp") == record  # the first one is untouched

    reg.delete_adapter("polyp")
    with pytest.raises(NotFound):
        reg.get_adapter("polyp")
    assert not store.exists("adapters/polyp")
    with pytest.raises(NotFound):
        reg.delete_adapter("polyp")
    assert [a.name for a in reg.list_adapters()] == ["camo"]


@pytest.mark.parametrize("name", ["Polyp", "-x", "", "a" * 65, "a/b", "a.b", "ü"])
def test_bad_adapter_names(reg: Registry, name: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidName):
        reg.add_adapter(name, make_adapter(tmp_path / "a"))


@pytest.mark.parametrize("name", ["base", "live", "auto"])
def test_reserved_adapter_names(reg: Registry, name: str, tmp_path: Path) -> None:
    """What a request's adapter means besides a stored one never names a stored adapter."""
    with pytest.raises(InvalidName, match="reserved"):
        reg.add_adapter(name, make_adapter(tmp_path / "a"))
    assert reg.list_adapters() == []
    reg.add_adapter(f"{name}-1", make_adapter(tmp_path / "b"))  # as a prefix: fine


def test_not_an_adapter_directory(reg: Registry, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    (src / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="missing"):
        reg.add_adapter("a", src)
    src = make_adapter(tmp_path / "b")
    (src / "extra.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="pickle"):
        reg.add_adapter("b", src)
    assert reg.list_adapters() == []


def test_failed_upload_leaves_no_index_entry(reg: Registry, store: ArtifactStore,
                                             tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    (src / "zz_dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        reg.add_adapter("polyp", src)
    with pytest.raises(NotFound):
        reg.get_adapter("polyp")
    assert not store.exists("adapters/polyp")
    (src / "zz_dangling").unlink()
    assert reg.add_adapter("polyp", src).name == "polyp"  # the name is still free


def test_orphaned_artifact_is_replaced(reg: Registry, store: ArtifactStore,
                                       tmp_path: Path) -> None:
    """A crash after the upload but before the index write leaves files no index points to."""
    store.put_dir(make_adapter(tmp_path / "old"), "adapters/polyp")
    new = make_adapter(tmp_path / "new")
    record = reg.add_adapter("polyp", new)
    assert tree(reg.fetch_adapter("polyp", tmp_path / "cache")) == tree(new)
    assert record.sha256 == store.info("adapters/polyp").sha256


def test_fetch_adapter_round_trips_and_caches_by_content(reg: Registry, tmp_path: Path) -> None:
    first = make_adapter(tmp_path / "first")
    reg.add_adapter("polyp", first)
    cache = tmp_path / "cache"
    path = reg.fetch_adapter("polyp", cache)
    assert tree(path) == tree(first)
    assert reg.fetch_adapter("polyp", cache) == path  # second fetch: the cached copy
    # Same name, new content: a different cache entry, never the stale copy.
    reg.delete_adapter("polyp")
    second = make_adapter(tmp_path / "second")
    reg.add_adapter("polyp", second)
    fresh = reg.fetch_adapter("polyp", cache)
    assert fresh != path and tree(fresh) == tree(second)
    with pytest.raises(NotFound):
        reg.fetch_adapter("nope", cache)


def test_versions_are_numbered_and_stored(reg: Registry, tmp_path: Path) -> None:
    assert reg.latest_version() is None and reg.list_versions() == []
    adapter = make_adapter(tmp_path / "merged")
    state = make_state(tmp_path / "state.safetensors")
    v1 = reg.create_version(adapter, state, {"parent": None, "domains": ["polyp"]})
    v2 = reg.create_version(adapter, state, {"parent": 1, "domains": ["polyp", "camo"]})
    assert (v1.number, v2.number) == (1, 2)
    assert v2.artifact_key == "versions/v2"
    assert reg.get_version(2) == v2 and reg.latest_version() == v2
    assert [v.number for v in reg.list_versions()] == [1, 2]
    local = reg.fetch_version(2, tmp_path / "cache")
    assert tree(local / v2.adapter_dir) == tree(adapter)
    assert (local / v2.state_file).read_bytes() == state.read_bytes()
    assert reg.get_version(1).lineage == {"parent": None, "domains": ["polyp"]}
    with pytest.raises(NotFound):
        reg.get_version(3)


def test_concurrent_creators_get_distinct_increasing_numbers(
        reg: Registry, redis_server: RedisServer, store: ArtifactStore, tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "merged")
    writers, per_writer = 4, 3
    barrier, made, errors = threading.Barrier(writers), queue.Queue(), queue.Queue()

    def create(writer: int) -> None:
        own = Registry(connect(redis_server.url), store)  # one client per "worker process"
        state = make_state(tmp_path / f"state{writer}", f"writer {writer}".encode())
        barrier.wait()
        try:
            for i in range(per_writer):
                record = own.create_version(adapter, state, {"writer": writer, "i": i})
                made.put((writer, i, record.number))
        except Exception as exc:  # pragma: no cover - reported below
            errors.put(exc)

    threads = [threading.Thread(target=create, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors.empty(), errors.get()
    results = [made.get() for _ in range(made.qsize())]
    numbers = sorted(n for _, _, n in results)
    assert numbers == list(range(1, writers * per_writer + 1))
    for writer in range(writers):  # each writer saw its own numbers strictly increase
        own = [n for w, _, n in sorted(results) if w == writer]
        assert own == sorted(own)
    for writer, i, number in results:  # and each number holds that writer's files
        record = reg.get_version(number)
        assert record.lineage == {"writer": writer, "i": i}
        local = reg.fetch_version(number, tmp_path / "cache")
        assert (local / "merge_state.safetensors").read_bytes() == f"writer {writer}".encode()


def test_version_numbers_are_never_reused(reg: Registry, redis_client: redis.Redis,
                                          tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "merged")
    reg.create_version(adapter, make_state(tmp_path / "s1", b"one"), {"n": 1})
    reg.create_version(adapter, make_state(tmp_path / "s2", b"two"), {"n": 2})
    redis_client.flushdb()  # Redis lost everything (counter included); the store did not
    record = reg.create_version(adapter, make_state(tmp_path / "s3", b"three"), {"n": 3})
    assert record.number == 3
    v1 = reg.store.local_path("versions/v1") / "merge_state.safetensors"
    assert v1.read_bytes() == b"one"  # never overwritten


def test_deleting_an_adapter_keeps_versions(reg: Registry, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "polyp")
    reg.add_adapter("polyp", src)
    local = reg.fetch_adapter("polyp", tmp_path / "cache")
    version = reg.create_version(local, make_state(tmp_path / "s"), {"adapters": ["polyp"]})
    reg.delete_adapter("polyp")
    got = reg.fetch_version(version.number, tmp_path / "cache2")
    assert tree(got / "adapter") == tree(src)


def test_activate_and_live_notifications(reg: Registry, tmp_path: Path) -> None:
    adapter, state = make_adapter(tmp_path / "m"), make_state(tmp_path / "s")
    for _ in range(3):
        reg.create_version(adapter, state)
    assert reg.live_version() is None
    with pytest.raises(NotFound):
        reg.activate(7)
    received: queue.Queue[int] = queue.Queue()
    # A long resync interval: within this test only pub/sub can deliver the change.
    sub = reg.subscribe_live(received.put, resync_interval_s=3600)
    try:
        assert sub.wait_ready(10)
        assert received.empty()  # nothing was live yet
        reg.activate(2)
        assert received.get(timeout=10) == 2
        assert reg.live_version() == 2
        reg.activate(1)  # rollback is just another activation
        assert received.get(timeout=10) == 1
        assert received.empty()
    finally:
        sub.stop()
    # A new follower is told the current version at once.
    late: queue.Queue[int] = queue.Queue()
    sub = reg.subscribe_live(late.put, resync_interval_s=3600)
    try:
        assert late.get(timeout=10) == 1
    finally:
        sub.stop()


def test_a_failed_live_callback_is_retried_until_it_succeeds(reg: Registry,
                                                             tmp_path: Path) -> None:
    """A follower that could not load the new version (its artifact store was unreachable,
    say) is called again at each resync, not left on the old version until the next change."""
    reg.create_version(make_adapter(tmp_path / "m"), make_state(tmp_path / "s"))
    reg.activate(1)
    calls: queue.Queue[int] = queue.Queue()
    failures = [2]

    def flaky(version: int) -> None:
        calls.put(version)
        if failures[0]:
            failures[0] -= 1
            raise OSError("artifact store unreachable")

    sub = reg.subscribe_live(flaky, resync_interval_s=0.2)
    try:
        assert [calls.get(timeout=10) for _ in range(3)] == [1, 1, 1]
        poll_until = time.monotonic() + 10
        while sub.last_version != 1 and time.monotonic() < poll_until:
            time.sleep(0.05)
        assert sub.last_version == 1
        time.sleep(0.6)  # delivered now: not called again for the same version
        assert calls.empty()
    finally:
        sub.stop()


@pytest.mark.parametrize("downtime_s", [0.0, 1.0])
def test_live_listener_survives_a_redis_restart(tmp_path: Path, free_port: int,
                                                downtime_s: float) -> None:
    """Quick restart: redis-py reconnects by itself; long one: the listener gives up on the
    connection and resubscribes. Either way the change made right after comes through."""
    server = RedisServer(tmp_path / "redis", free_port).start()
    try:
        reg = Registry(connect(server.url), ArtifactStore(tmp_path / "artifacts"))
        adapter, state = make_adapter(tmp_path / "m"), make_state(tmp_path / "s")
        reg.create_version(adapter, state)
        reg.create_version(adapter, state)
        reg.activate(1)
        received: queue.Queue[int] = queue.Queue()
        sub = reg.subscribe_live(received.put, resync_interval_s=3600)
        try:
            assert received.get(timeout=10) == 1
            server.stop()
            time.sleep(downtime_s)
            server.start()  # same data_dir and port: the registry's data is back
            reg.activate(2)
            assert received.get(timeout=15) == 2
            assert sub.last_version == 2
        finally:
            sub.stop()
    finally:
        server.stop()


def test_merge_lock_serialises(reg: Registry) -> None:
    inside = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with reg.merge_lock(timeout_s=30):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert inside.wait(10)
        with pytest.raises(LockTimeout), reg.merge_lock(timeout_s=30, blocking_timeout_s=0.2):
            pass
    finally:
        release.set()
        t.join()
    with reg.merge_lock(timeout_s=30, blocking_timeout_s=5) as lock:
        assert lock.owned()
    assert not reg._redis.exists(keys.MERGE_LOCK)


def test_merge_lock_is_renewed_while_held(reg: Registry) -> None:
    """A merge longer than the lock's lease keeps the lock (a heartbeat renews it)."""
    with reg.merge_lock(timeout_s=0.6) as lock:
        time.sleep(1.5)  # 2.5 leases
        assert lock.owned()
        with pytest.raises(LockTimeout), reg.merge_lock(timeout_s=5, blocking_timeout_s=0.2):
            pass
    assert not reg._redis.exists(keys.MERGE_LOCK)


def test_a_dead_holders_merge_lock_lapses_within_its_lease(reg: Registry) -> None:
    # A holder that died leaves its key with the lease's TTL and nobody renewing it.
    reg._redis.set(keys.MERGE_LOCK, "dead-worker-token", px=500)
    with reg.merge_lock(timeout_s=5, blocking_timeout_s=5) as lock:
        assert lock.owned()


def test_a_version_is_not_registered_once_its_merge_lock_is_lost(reg: Registry,
                                                                 tmp_path: Path) -> None:
    adapter, state = make_adapter(tmp_path / "a"), make_state(tmp_path / "state")
    with reg.merge_lock(timeout_s=30) as lock:
        kept = reg.create_version(adapter, state, {"domains": ["a"]}, fence=lock)
        reg._redis.set(keys.MERGE_LOCK, "someone-else")  # it lapsed and another merge took it
        with pytest.raises(registry.MergeLockLost):
            reg.create_version(adapter, state, {"domains": ["b"]}, fence=lock)
    assert [v.number for v in reg.list_versions()] == [kept.number]
