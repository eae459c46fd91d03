"""Dataset registry against a real Redis and a local artifact store."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from infra import keys
from infra.artifacts import ArtifactStore
from infra.datasets import DatasetRegistry, dataset_format, open_dataset
from infra.errors import ConfigError, Conflict, InvalidName, NotFound
from regcl.data.coco import CocoDataset
from regcl.data.folders import FolderPairDataset
from regcl.errors import DataError


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def datasets(redis_client: redis.Redis, store: ArtifactStore) -> DatasetRegistry:
    return DatasetRegistry(redis_client, store)


def _square_mask(size: int, lo: int, hi: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[lo:hi, lo:hi] = 255
    return mask


def make_folders(root: Path, count: int = 3, size: int = 24) -> Path:
    """``count`` image/mask PNG pairs (a bright square on noise) in the folder layout."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(_square_mask(size, 4 + i, 14 + i)).save(root / "masks" / f"s{i}.png")
    return root


def make_coco(root: Path, size: int = 24) -> Path:
    """Two images, three annotated objects (polygons), in the COCO layout."""
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for image_id in (1, 2):
        Image.fromarray(np.full((size, size, 3), 80 * image_id, dtype=np.uint8)).save(
            root / "images" / f"im{image_id}.png")
        images.append({"id": image_id, "file_name": f"im{image_id}.png", "height": size,
                       "width": size})
    for ann_id, (image_id, lo) in enumerate([(1, 2), (1, 12), (2, 5)], start=1):
        hi = lo + 8
        annotations.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                            "segmentation": [[lo, lo, hi, lo, hi, hi, lo, hi]]})
    (root / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1}]}))
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_open_dataset_picks_the_loader_by_layout(tmp_path: Path) -> None:
    folders = open_dataset(make_folders(tmp_path / "f"))
    assert isinstance(folders, FolderPairDataset) and len(folders) == 3
    assert folders[0].image.shape == (24, 24, 3) and folders[0].mask.sum() == 100
    coco = open_dataset(make_coco(tmp_path / "c"))
    assert isinstance(coco, CocoDataset) and len(coco) == 3
    assert dataset_format(tmp_path / "f") == "folders" and dataset_format(tmp_path / "c") == "coco"


def test_open_dataset_refuses_what_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a dataset"):
        open_dataset(tmp_path / "empty")
    both = make_coco(tmp_path / "both")
    (both / "masks").mkdir()
    with pytest.raises(DataError, match="both"):
        open_dataset(both)
    blank = make_folders(tmp_path / "blank", count=1)
    Image.fromarray(np.zeros((24, 24), dtype=np.uint8)).save(blank / "masks" / "s0.png")
    with pytest.raises(DataError, match="empty"):
        open_dataset(blank)


def test_add_get_list_fetch_delete(datasets: DatasetRegistry, store: ArtifactStore,
                                   redis_client: redis.Redis, tmp_path: Path) -> None:
    src = make_folders(tmp_path / "polyp")
    record = datasets.add_dataset("polyp", src, {"domain": "polyp"})
    assert (record.format, record.count, record.metadata) == ("folders", 3, {"domain": "polyp"})
    assert record.artifact_key == "datasets/polyp" and store.exists("datasets/polyp")
    assert datasets.get_dataset("polyp") == record
    assert redis_client.hexists(keys.DATASETS, "polyp")
    coco = datasets.add_dataset("camo", make_coco(tmp_path / "camo"))
    assert (coco.format, coco.count) == ("coco", 3)
    assert [d.name for d in datasets.list_datasets()] == ["camo", "polyp"]

    local = datasets.fetch_dataset("polyp", tmp_path / "cache")
    assert tree(local) == tree(src)
    assert datasets.fetch_dataset("polyp", tmp_path / "cache") == local  # cached by digest
    assert len(open_dataset(local)) == 3

    datasets.delete_dataset("polyp")
    with pytest.raises(NotFound):
        datasets.get_dataset("polyp")
    with pytest.raises(NotFound):
        datasets.delete_dataset("polyp")
    assert not store.exists("datasets/polyp")
    assert [d.name for d in datasets.list_datasets()] == ["camo"]


def test_add_refuses_taken_names_bad_names_and_bad_data(datasets: DatasetRegistry,
                                                        store: ArtifactStore,
                                                        tmp_path: Path) -> None:
    first = datasets.add_dataset("polyp", make_folders(tmp_path / "a"))
    with pytest.raises(Conflict):
        datasets.add_dataset("polyp", make_folders(tmp_path / "b", count=2))
    assert datasets.get_dataset("polyp") == first
    with pytest.raises(InvalidName):
        datasets.add_dataset("../etc", make_folders(tmp_path / "c"))
    with pytest.raises(InvalidName):
        datasets.get_dataset("Polyp")
    with pytest.raises(ConfigError):
        datasets.add_dataset("meta", make_folders(tmp_path / "d"), {"x": float("nan")})

    unpaired = make_folders(tmp_path / "e")
    (unpaired / "masks" / "s1.png").unlink()
    with pytest.raises(DataError, match="unpaired"):
        datasets.add_dataset("unpaired", unpaired)
    linked = make_folders(tmp_path / "f")
    (linked / "images" / "evil.png").symlink_to(linked / "images" / "s0.png")
    (linked / "masks" / "evil.png").symlink_to(linked / "masks" / "s0.png")
    with pytest.raises(DataError, match="symbolic links"):
        datasets.add_dataset("linked", linked)
    assert [d.name for d in datasets.list_datasets()] == ["polyp"]
    assert not store.exists("datasets/unpaired") and not store.exists("datasets/linked")


def test_orphaned_files_are_replaced_and_concurrent_adds_get_one_winner(
        datasets: DatasetRegistry, store: ArtifactStore, tmp_path: Path) -> None:
    # Files stored without an index entry: a crash between the two steps of an earlier add.
    store.put_dir(make_folders(tmp_path / "orphan", count=1), "datasets/polyp")
    record = datasets.add_dataset("polyp", make_folders(tmp_path / "new"))
    assert record.count == 3

    sources = [make_folders(tmp_path / f"race{i}", count=i + 1) for i in range(3)]
    outcomes: list[object] = []

    def add(src: Path) -> None:
        try:
            outcomes.append(datasets.add_dataset("camo", src))
        except Conflict as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=add, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if not isinstance(o, Conflict)]
    assert len(winners) == 1 and datasets.get_dataset("camo") == winners[0]
