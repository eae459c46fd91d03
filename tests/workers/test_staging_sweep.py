"""The reaper's hourly sweep of the artifact store's staging leftovers (files of puts that
never committed: a killed writer's, or one stopped at the API's store deadline). Real
redis-server (the session's), a local store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import redis

from infra.artifacts import ArtifactStore
from workers.reaper import STAGING_MAX_AGE_S, sweep_staging


def _leftover(store_root: Path, name: str, age_s: float) -> Path:
    entry = store_root / ".tmp" / name
    entry.mkdir(parents=True)
    (entry / "adapter_model.safetensors").write_bytes(b"x" * 16)
    then = time.time() - age_s
    os.utime(entry, (then, then))
    return entry


def test_old_leftovers_go_once_per_interval_and_committed_artifacts_stay(
        redis_client: redis.Redis, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    store = ArtifactStore(root)
    source = tmp_path / "src"
    source.mkdir()
    (source / "adapter_config.json").write_text("{}")
    info = store.put_dir(source, "adapters/kept")
    old = _leftover(root, "a" * 32, STAGING_MAX_AGE_S + 60)
    young = _leftover(root, "b" * 32, 60)

    assert sweep_staging(store, redis_client, interval_s=30) == 1
    assert not old.exists() and young.exists()
    assert store.info("adapters/kept") == info
    again = _leftover(root, "c" * 32, STAGING_MAX_AGE_S + 60)
    assert sweep_staging(store, redis_client, interval_s=30) is None  # another's turn
    assert again.exists()
