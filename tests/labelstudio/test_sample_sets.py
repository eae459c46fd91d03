"""Per-domain sample sets on a real redis-server and a local artifact store: the append-only
log, removals, the split by task that stays put as tasks arrive, and snapshots into ordinary
immutable datasets that open like any other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from infra import keys
from infra.artifacts import ArtifactStore
from infra.datasets import DatasetRegistry, open_dataset
from infra.errors import InvalidName
from infra.sample_sets import SampleSets, default_domain, split_tasks
from regcl.errors import DataError
from tests.service.api_support import png_bytes


def _sample(seed: int) -> tuple[str, bytes, bytes]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    mask = np.zeros((24, 32), dtype=np.uint8)
    mask[4:12 + seed % 5, 6:20] = 255
    return f"{seed:064x}", png_bytes(image), png_bytes(mask)


@pytest.fixture
def sets(redis_client: redis.Redis, tmp_path: Path) -> SampleSets:
    store = ArtifactStore(tmp_path / "artifacts")
    return SampleSets(redis_client, store, DatasetRegistry(redis_client, store))


def test_put_update_delete_replay(sets: SampleSets) -> None:
    image_id, image, mask = _sample(1)
    assert sets.put("ls-1", 10, 100, image_id, image, [mask]) == 1
    assert sets.put("ls-1", 11, 101, image_id, image, [mask, mask]) == 2
    assert sets.put("ls-1", 10, 100, image_id, image, []) == 3  # updated: no masks now
    assert sets.remove("ls-1", 11)
    assert not sets.remove("ls-1", 99)  # unknown: nothing written
    entries = sets.entries("ls-1")
    assert list(entries) == [10] and entries[10].masks == ()
    assert sets.pending("ls-1") == 4
    assert sets.domains() == ["ls-1"]
    assert sets.store.exists(entries[10].image)  # files are content-addressed, kept


def test_names_and_ids_are_checked(sets: SampleSets, redis_client: redis.Redis) -> None:
    image_id, image, mask = _sample(2)
    with pytest.raises(InvalidName):
        sets.put("../x", 1, 1, image_id, image, [mask])
    with pytest.raises(DataError):
        sets.put("ls-1", -1, 1, image_id, image, [mask])
    with pytest.raises(DataError):
        sets.put("ls-1", 1, 1, "not-a-digest", image, [mask])
    assert not redis_client.keys("*")  # nothing written


def test_split_by_task_is_stable_as_tasks_arrive() -> None:
    train, held = split_tasks(range(40), seed=3, fraction=0.25)
    assert set(train) | set(held) == set(range(40)) and not set(train) & set(held)
    assert 4 <= len(held) <= 16
    more_train, more_held = split_tasks(range(80), seed=3, fraction=0.25)
    assert set(held) <= set(more_held) and set(train) <= set(more_train)
    assert split_tasks([5, 9], seed=0, fraction=0.01)[1]  # at least one held out
    assert split_tasks([5, 9], seed=0, fraction=0.99)[0]  # and one to train on
    with pytest.raises(DataError, match="at least 2"):
        split_tasks([4, 4, 4], seed=0, fraction=0.5)


def test_snapshot_makes_immutable_datasets(sets: SampleSets, tmp_path: Path) -> None:
    for task in range(6):
        image_id, image, mask = _sample(task)
        sets.put("ls-7", 100 + task, task, image_id, image, [mask] * (1 + task % 2))
    snap = sets.snapshot("ls-7", seed=0, holdout=0.34, work_dir=tmp_path,
                         metadata={"project": 7})
    assert snap.seq == 1 and snap.annotations == 6
    assert snap.train.name == "ls-7-s1-train" and snap.heldout.name == "ls-7-s1-heldout"
    assert snap.train.count + snap.heldout.count == 9  # 3 annotations hold 2 masks
    train = set(snap.train.metadata["annotations"])
    held = set(snap.heldout.metadata["annotations"])
    assert train | held == set(range(100, 106)) and not train & held
    assert snap.train.metadata["project"] == 7 and snap.train.metadata["split"] == "train"
    local = sets.datasets.fetch_dataset(snap.heldout.name, tmp_path / "cache")
    dataset = open_dataset(local)
    assert len(dataset) == snap.heldout.count
    assert dataset[0].mask.shape == dataset[0].image.shape[:2] == (24, 32)
    assert sets.pending("ls-7") == 0
    sets.remove("ls-7", 100)
    assert sets.pending("ls-7") == 1
    again = sets.snapshot("ls-7", seed=0, holdout=0.34, work_dir=tmp_path)
    assert again.seq == 2 and again.annotations == 5
    assert set(again.heldout.metadata["annotations"]) == held - {100}


def test_a_snapshot_taken_again_for_its_key_is_the_same(sets: SampleSets,
                                                       tmp_path: Path) -> None:
    """A continual step's rerun (its worker died) takes its snapshot again: the same number,
    the same log entries (not those that came since), the datasets not stored twice."""
    for task in range(4):
        image_id, image, mask = _sample(task)
        sets.put("ls-9", 100 + task, task, image_id, image, [mask])
    first = sets.snapshot("ls-9", seed=0, holdout=0.34, work_dir=tmp_path, key="job-1")
    sets.datasets.delete_dataset(first.heldout.name)  # as if killed before storing it
    image_id, image, mask = _sample(4)
    sets.put("ls-9", 104, 4, image_id, image, [mask])
    again = sets.snapshot("ls-9", seed=0, holdout=0.34, work_dir=tmp_path, key="job-1")
    assert (again.seq, again.log_length, again.annotations) == (1, 4, 4)
    assert again.train == first.train  # reused, not stored again
    assert again.heldout.metadata["annotations"] == first.heldout.metadata["annotations"]
    assert sorted(d.name for d in sets.datasets.list_datasets()) == [
        "ls-9-s1-heldout", "ls-9-s1-train"]
    assert sets.pending("ls-9") == 1  # the put since
    other = sets.snapshot("ls-9", seed=0, holdout=0.34, work_dir=tmp_path, key="job-2")
    assert (other.seq, other.annotations) == (2, 5) and sets.pending("ls-9") == 0


def test_snapshot_needs_two_tasks(sets: SampleSets, redis_client: redis.Redis,
                                  tmp_path: Path) -> None:
    image_id, image, mask = _sample(3)
    sets.put("ls-8", 1, 5, image_id, image, [mask])
    sets.put("ls-8", 2, 5, image_id, image, [mask])
    with pytest.raises(DataError, match="at least 2"):
        sets.snapshot("ls-8", seed=0, holdout=0.5, work_dir=tmp_path)
    assert sets.datasets.list_datasets() == []
    assert redis_client.get(keys.samples("ls-8", "seq")) is None


def test_project_settings(sets: SampleSets) -> None:
    assert sets.project(4).domain == default_domain(4) == "ls-4"
    sets.configure_project(4, "endoscopy", {"train": {"epochs": 2}})
    settings = sets.project(4)
    assert settings.domain == "endoscopy" and settings.step == {"train": {"epochs": 2}}
    with pytest.raises(InvalidName):
        sets.configure_project(4, "Bad Name", {})
    assert sets.project(4).domain == "endoscopy"
