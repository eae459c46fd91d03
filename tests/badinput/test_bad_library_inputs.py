"""The same bad inputs where they enter the library and the platform (no server): each raises
its typed error, which is also a ``ValueError`` (the project's error base classes subclass the
built-in), and writes nothing outside where it was asked to."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from infra.datasets import open_dataset, verify_samples
from regcl.adapters import read_adapter
from regcl.data.images import decode_image_bytes
from regcl.errors import AdapterError, DataError, StatsError
from service.api.uploads import extract_zip
from service.engine import errors as E
from service.engine.errors import ServiceError
from service.engine.prompt_checks import Prompt, check_bounds, check_prompt
from tests.badinput.bad_support import image_file, png_with_header
from tests.service.api_support import folder_entries, make_image, make_zip, png_bytes

SIDE = (64, 64)
P = [[1.0, 1.0]]

PROMPTS = {
    "nan": ({"point_coords": [[math.nan, 1.0]], "point_labels": [1]}, E.NonFiniteValueError),
    "inf-box": ({"box": [0, 0, math.inf, 1]}, E.NonFiniteValueError),
    "ragged": ({"point_coords": [[1.0], [1.0, 2.0]], "point_labels": [1, 1]},
               E.PromptShapeError),
    "three-d": ({"point_coords": [[[1.0, 2.0]]], "point_labels": [1]}, E.PromptShapeError),
    "labels-only": ({"point_labels": [1]}, E.PromptShapeError),
    "labels-2d": ({"point_coords": P, "point_labels": [[1]]}, E.PromptShapeError),
    "label-2": ({"point_coords": P, "point_labels": [2]}, E.InvalidLabelError),
    "label-str": ({"point_coords": P, "point_labels": ["a"]}, E.InvalidLabelError),
    "box-reversed": ({"box": [5, 0, 1, 1]}, E.InvalidBoxError),
    "box-shape": ({"box": [1, 2, 3]}, E.PromptShapeError),
    "empty": ({}, E.EmptyPromptError),
    "empty-points": ({"point_coords": [], "point_labels": []}, E.EmptyPromptError),
    "too-many": ({"point_coords": [[1.0, 1.0]] * 65, "point_labels": [1] * 65},
                 E.TooManyPointsError),
    "mask-shape": ({"mask_input": np.zeros((32, 32))}, E.PromptShapeError),
    "mask-nan": ({"mask_input": np.full(SIDE, np.nan)}, E.NonFiniteValueError),
    "mask-huge": ({"mask_input": np.full(SIDE, -1e7)}, E.ValueOutOfRangeError),
}


@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_check_prompt_raises_typed_errors(case):
    kwargs, error = PROMPTS[case]
    with pytest.raises(error) as caught:
        check_prompt(**kwargs, mask_input_size=SIDE)
    assert isinstance(caught.value, ValueError) and caught.value.code


@pytest.mark.parametrize("prompt", [
    Prompt(point_coords=np.array([[129.0, 1.0]]), point_labels=np.array([1])),
    Prompt(point_coords=np.array([[1.0, -0.5]]), point_labels=np.array([1])),
    Prompt(box=np.array([0.0, 0.0, 10.0, 97.0])),
])
def test_check_bounds(prompt):
    with pytest.raises(E.OutOfBoundsError):
        check_bounds(prompt, (96, 128))


IMAGES = {
    "empty": b"",
    "text": b"hello",
    "truncated": png_bytes(make_image(0))[:200],
    "bomb-header": png_with_header(50_000, 50_000),
    "zero-width": png_with_header(0, 10),
    "gif": image_file(Image.fromarray(make_image(0)), "GIF"),
    "float": image_file(Image.fromarray(np.ones((4, 4), np.float32)), "TIFF"),
}


@pytest.mark.parametrize("case", sorted(IMAGES))
def test_decode_image_bytes_raises_data_error(case):
    with pytest.raises(DataError):
        decode_image_bytes(IMAGES[case], 16_000_000)


def test_decode_image_bytes_refuses_real_bomb_under_a_small_cap():
    data = image_file(Image.new("1", (6000, 6000)))
    with pytest.raises(DataError, match="max_pixels"):
        decode_image_bytes(data, 16_000_000)


ARCHIVES = {
    "slip": (make_zip({"../x.png": b"x"}), "unsafe-file"),
    "absolute": (make_zip({"/x.png": b"x"}), "unsafe-file"),
    "backslash": (make_zip({"a\\..\\x.png": b"x"}), "unsafe-file"),
    "link": (make_zip({}, links={"a.png": "/etc/passwd"}), "unsafe-file"),
    "exe": (make_zip({"a.exe": b"x"}), "unsafe-file"),
    "bomb": (make_zip({"a.png": b"\0" * (3 * 2**20)}), "payload-too-large"),
    "empty": (make_zip({}), "invalid-archive"),
    "not-zip": (b"nope", "invalid-archive"),
}


@pytest.mark.parametrize("case", sorted(ARCHIVES))
def test_extract_zip_refuses_and_writes_nothing_outside(tmp_path, case):
    data, code = ARCHIVES[case]
    archive = tmp_path / "a.zip"
    archive.write_bytes(data)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ServiceError) as caught:
        extract_zip(archive, dest, max_files=100, max_bytes=2 * 2**20)
    assert caught.value.code == code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "dest"]
    assert not list(dest.rglob("*"))  # refused while planning: nothing extracted


def _folder(root: Path, entries: dict[str, bytes]) -> Path:
    for name, data in entries.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_verify_samples_refuses_masks_that_do_not_match(tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[2:9, 2:9] = 255
    root = _folder(tmp_path, {**folder_entries(), "masks/s1.png": png_bytes(mask)})
    dataset = open_dataset(root)  # lazily: opening alone does not read the images
    with pytest.raises(DataError, match="mask"):
        verify_samples(dataset)


def test_verify_samples_refuses_unreadable_images(tmp_path):
    root = _folder(tmp_path, {**folder_entries(), "images/s2.png": b"garbage"})
    with pytest.raises(DataError):
        verify_samples(open_dataset(root))


def test_verify_samples_counts_good_datasets(tmp_path):
    assert verify_samples(open_dataset(_folder(tmp_path, folder_entries()))) == 3


@pytest.fixture(scope="module")
def adapter_dir(adapter_dirs) -> Path:
    return adapter_dirs["stats"]


def _copy(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments:UserWarning")  # the IA3 case
def test_read_adapter_typed_errors(adapter_dir, tmp_path):
    d = _copy(adapter_dir, tmp_path / "pickle")
    (d / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterError, match="pickle"):
        read_adapter(d)
    d = _copy(adapter_dir, tmp_path / "bad-config")
    (d / "adapter_config.json").write_text("{nope")
    with pytest.raises(AdapterError):
        read_adapter(d)
    d = _copy(adapter_dir, tmp_path / "not-lora")
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterError):
        read_adapter(d)
    d = _copy(adapter_dir, tmp_path / "stats")
    stats = load_file(str(d / "regcl_stats.safetensors"))
    gram = sorted(k for k in stats if k.endswith(".gram"))[0]
    stats[gram] = stats[gram] * float("nan")
    save_file(stats, str(d / "regcl_stats.safetensors"))
    with pytest.raises(StatsError):
        read_adapter(d)
    d = _copy(adapter_dir, tmp_path / "missing")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="missing"):
        read_adapter(d)
