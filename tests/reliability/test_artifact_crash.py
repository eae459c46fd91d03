"""Artifact writes are atomic: a process killed in the middle of storing a merged version or an
adapter, or a write that fails half-way, leaves nothing the registry points to and nothing
half-written at an artifact's key; the next write works.

The kill is placed exactly: one file of the artifact being stored is a FIFO, so the writer
blocks in the middle of copying it, after the test has fed it half of the real bytes.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.errors import Conflict, NotFound
from tests.reliability.support import Rig, poll, say
from tests.service.api_support import make_adapter

WRITER = """
import sys
import infra.named_artifacts
from infra.artifacts import ArtifactStore
from infra.redis_client import connect
from infra.registry import Registry

infra.named_artifacts._LOCK_TIMEOUT_S = 2.0  # a short lease, so the test need not wait long
registry = Registry(connect(sys.argv[1]), ArtifactStore(sys.argv[2]))
if sys.argv[3] == "version":
    registry.create_version(sys.argv[4], sys.argv[5], {"domains": ["crash"]})
else:
    registry.add_adapter(sys.argv[4], sys.argv[5])
"""


def fifo_adapter(rig: Rig, name: str, seed: int) -> tuple[Path, bytes]:
    """An adapter directory whose weights file is a FIFO, and the real weights."""
    directory = make_adapter(rig.root / "fifo" / name, seed)
    weights = directory / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    os.mkfifo(weights)
    return directory, data


def kill_mid_write(rig: Rig, args: list[str], fifo: Path, data: bytes) -> list[str]:
    """Run the writer, feed half of ``data`` through ``fifo`` and SIGKILL it while it waits
    for the rest (its copy of the weights is open in the staging area); the files staged."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, rig.settings.redis_url,
                               rig.settings.artifact_url, *args], cwd=Path.cwd(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    fd = -1

    def reader_open() -> bool:
        nonlocal fd
        assert writer.poll() is None, writer.communicate()[0].decode()
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # the writer has not opened it yet
                return False
            raise
        return True

    poll(reader_open, "the writer to open the weights", timeout_s=120)
    os.set_blocking(fd, True)
    os.write(fd, data[: len(data) // 2])
    staging = Path(rig.settings.artifact_url) / ".tmp"
    poll(lambda: any(staging.rglob("adapter_model.safetensors")),
         "the writer to start copying the weights", timeout_s=60)
    time.sleep(0.5)  # it reads the half we gave and blocks for the rest
    assert writer.poll() is None
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
    os.close(fd)
    return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*")
                  if p.is_file())


def test_a_writer_killed_mid_put_leaves_nothing_the_registry_points_to(rig: Rig) -> None:
    good = make_adapter(rig.root / "good", seed=1)
    state = rig.root / "merge_state.safetensors"
    state.write_bytes(os.urandom(4096))
    first = rig.registry.create_version(good, state, {"domains": ["good"]})
    rig.registry.add_adapter("good", good)

    # A merged version killed while its weights are half copied.
    directory, data = fifo_adapter(rig, "v", seed=2)
    staged = kill_mid_write(rig, ["version", str(directory), str(state)],
                            directory / "adapter_model.safetensors", data)
    assert [v.number for v in rig.registry.list_versions()] == [first.number]
    figures = rig.check_store()
    assert figures["staging_leftovers"] == 1  # the half-written copy, under .tmp/ only
    assert sorted(rig.store.iter_keys("versions")) == [first.artifact_key]
    say(f"version writer SIGKILLed while copying its weights (half of {len(data)} bytes fed; "
        f"staged: {staged}): versions registered {figures['versions']} (unchanged), "
        f"half-written files only in the staging area ({figures['staging_leftovers']} entry)")

    # A domain adapter upload killed the same way.
    directory, data = fifo_adapter(rig, "crash", seed=3)
    staged = kill_mid_write(rig, ["adapter", "crash", str(directory)],
                            directory / "adapter_model.safetensors", data)
    with pytest.raises(NotFound):
        rig.registry.get_adapter("crash")
    assert not rig.store.exists("adapters/crash")
    assert [a.name for a in rig.registry.list_adapters()] == ["good"]
    rig.check_store()
    say(f"adapter upload SIGKILLed while copying its weights (staged: {len(staged)} files): "
        "not registered, nothing at its key")

    # The next writes work: the version number the dead writer took is not reused, and the
    # dead uploader's per-name lock lapses (its lease), so the name can be uploaded.
    removed = rig.store.cleanup_temp(older_than_s=0)
    again = rig.registry.create_version(good, state, {"domains": ["again"]})
    assert again.number == first.number + 2
    (directory / "adapter_model.safetensors").unlink()
    (directory / "adapter_model.safetensors").write_bytes(data)
    start = time.monotonic()
    while True:
        try:
            rig.registry.add_adapter("crash", directory)
            break
        except Conflict:
            assert time.monotonic() - start < 30, "the dead uploader's lock never lapsed"
            time.sleep(0.2)
    figures = rig.check_store()
    assert figures == {"adapters": 2, "versions": 2, "staging_leftovers": 0}
    say(f"after the crashes: {removed} staging leftovers cleaned, next version "
        f"v{again.number}, adapter name free again after {time.monotonic() - start:.1f} s")


def test_a_write_that_fails_half_way_leaves_nothing(rig: Rig) -> None:
    directory = make_adapter(rig.root / "broken", seed=4)
    # A file that vanishes between listing and copying: the copy fails after the others.
    (directory / "zz_vanished.json").symlink_to(rig.root / "nowhere")
    state = rig.root / "merge_state.safetensors"
    state.write_bytes(os.urandom(4096))
    with pytest.raises(FileNotFoundError):
        rig.registry.create_version(directory, state, {"domains": ["broken"]})
    with pytest.raises(FileNotFoundError):
        rig.registry.add_adapter("broken", directory)
    assert rig.registry.list_versions() == [] and rig.registry.list_adapters() == []
    assert rig.check_store() == {"adapters": 0, "versions": 0, "staging_leftovers": 0}
    assert list(rig.store.iter_keys("versions")) == []
    (directory / "zz_vanished.json").unlink()
    assert rig.registry.add_adapter("broken", directory).name == "broken"
    shutil.rmtree(directory)
    assert rig.check_store()["adapters"] == 1
