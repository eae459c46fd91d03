"""Datasets laid out as two folders of images and masks paired by file stem.

This is how Kvasir-SEG (``images/a.jpg`` + ``masks/a.jpg``), ISIC
(``ISIC_0000000.jpg`` + ``ISIC_0000000_segmentation.png``), CAMO, SBU and most other binary
segmentation sets ship. Pairing is checked eagerly from file names; pixels are read in
``__getitem__`` (see :mod:`regcl.data.images` for the conversion and binarisation rules).
"""

from __future__ import annotations

import logging
from pathlib import Path

from regcl.data.images import DEFAULT_MAX_PIXELS, check_max_pixels, read_image_rgb, read_mask
from regcl.data.types import Sample, SampleDataset
from regcl.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
"""File extensions (compared lower-case) read as images or masks; other files are ignored."""

AUTO_MASK_SUFFIXES = ("", "_segmentation")
"""Mask-stem suffixes tried when ``mask_suffix`` is None (plain stems, then ISIC style)."""

IGNORED_IMAGE_SUFFIXES = ("_superpixels",)
"""Image-folder stems with these endings are not images: ISIC 2017 ships superpixel maps there."""

_MAX_LISTED = 5


class FolderPairDataset(SampleDataset):
    """Images in ``root/image_dir`` paired with masks in ``root/mask_dir`` by file stem.

    A mask pairs with image ``<stem>.<ext>`` when it is named ``<stem><mask_suffix>.<ext2>``;
    extensions may differ (``a.jpg`` with ``a.png``). ``mask_suffix=None`` picks, among
    :data:`AUTO_MASK_SUFFIXES`, the suffix that pairs the most files (ties go to ``""``).

    Every image must have exactly one mask and every mask one image, else DataError. Samples are
    sorted by image stem. ``sample.name`` is the image stem.

    Args:
        root: dataset folder.
        image_dir, mask_dir: subfolders of ``root`` holding images and masks.
        mask_suffix: suffix of mask stems, or None to auto-detect.
        skip_empty: drop pairs whose mask has no foreground. Knowing which are empty needs
            their pixels, so the constructor then reads every mask once (not the images).
        max_pixels: largest image or mask (width x height) read; larger ones raise DataError.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        image_dir: str = "images",
        mask_dir: str = "masks",
        mask_suffix: str | None = None,
        skip_empty: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = Path(root)
        self.max_pixels = check_max_pixels(max_pixels)
        if mask_suffix is not None and ("/" in mask_suffix or "\\" in mask_suffix):
            raise ConfigError(f"mask_suffix must not contain a path separator: {mask_suffix!r}")
        if not self.root.is_dir():
            raise DataError(f"dataset folder {self.root} does not exist or is not a folder")
        image_files = _list_files(self.root / image_dir, "image")
        mask_files = _list_files(self.root / mask_dir, "mask")
        image_files = {
            stem: path
            for stem, path in image_files.items()
            if not stem.endswith(IGNORED_IMAGE_SUFFIXES)
        }
        if not image_files:
            raise DataError(f"{self.root / image_dir}: no image files ({_extensions_text()})")
        if not mask_files:
            raise DataError(f"{self.root / mask_dir}: no mask files ({_extensions_text()})")

        self.mask_suffix = (
            mask_suffix if mask_suffix is not None else _detect_suffix(image_files, mask_files)
        )
        pairs = _pair(image_files, mask_files, self.mask_suffix, self.root)
        if skip_empty:
            kept = [(image, mask) for image, mask in pairs if read_mask(mask, max_pixels).any()]
            dropped = len(pairs) - len(kept)
            if dropped:
                logger.info(
                    "%s: dropped %d of %d pairs with empty masks", self.root, dropped, len(pairs)
                )
            if not kept:
                raise DataError(f"{self.root}: all {len(pairs)} masks are empty")
            pairs = kept
        self.pairs: tuple[tuple[Path, Path], ...] = tuple(pairs)
        logger.debug("%s: %d image/mask pairs", self.root, len(self.pairs))

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, index: int) -> Sample:
        """Read pair ``index``: image H x W x 3 uint8 RGB and mask H x W bool of the same H x W."""
        image_path, mask_path = self.pairs[index]
        image = read_image_rgb(image_path, self.max_pixels)
        mask = read_mask(mask_path, self.max_pixels)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"{mask_path}: mask is {mask.shape[0]} x {mask.shape[1]} (H x W) but image "
                f"{image_path.name} is {image.shape[0]} x {image.shape[1]}"
            )
        return Sample(image=image, mask=mask, name=image_path.stem)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, pairs={len(self)})"


def _list_files(folder: Path, kind: str) -> dict[str, Path]:
    """Map stem -> path of the image-like files directly in ``folder`` (hidden files skipped)."""
    if not folder.is_dir():
        raise DataError(f"{kind} folder {folder} does not exist or is not a folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        # Dot-files include macOS "._a.jpg" resource forks, which are not images.
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if not path.is_file():
            continue
        if path.stem in files:
            raise DataError(
                f"{folder}: two {kind} files share the stem {path.stem!r} "
                f"({files[path.stem].name}, {path.name}); pairing would be ambiguous"
            )
        files[path.stem] = path
    return files


def _detect_suffix(images: dict[str, Path], masks: dict[str, Path]) -> str:
    """Return the suffix of :data:`AUTO_MASK_SUFFIXES` that pairs the most images."""
    counts = [sum(stem + suffix in masks for stem in images) for suffix in AUTO_MASK_SUFFIXES]
    best = max(range(len(counts)), key=lambda i: (counts[i], -i))
    return AUTO_MASK_SUFFIXES[best]


def _pair(
    images: dict[str, Path], masks: dict[str, Path], suffix: str, root: Path
) -> list[tuple[Path, Path]]:
    """Pair images with masks by stem; raise DataError listing unpaired files of either side."""
    pairs: list[tuple[Path, Path]] = []
    lonely_images: list[str] = []
    for stem in sorted(images):
        mask = masks.get(stem + suffix)
        if mask is None:
            lonely_images.append(images[stem].name)
        else:
            pairs.append((images[stem], mask))
    paired_masks = {mask for _, mask in pairs}
    lonely_masks = sorted(path.name for path in masks.values() if path not in paired_masks)
    problems = []
    if lonely_images:
        problems.append(f"{len(lonely_images)} images have no mask ({_names(lonely_images)})")
    if lonely_masks:
        problems.append(f"{len(lonely_masks)} masks have no image ({_names(lonely_masks)})")
    if problems:
        raise DataError(
            f"{root}: unpaired files with mask_suffix={suffix!r}: " + "; ".join(problems)
        )
    return pairs


def _names(names: list[str]) -> str:
    """The first few of ``names``, comma-separated, with an ellipsis when there are more."""
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (", ..." if len(names) > _MAX_LISTED else "")


def _extensions_text() -> str:
    return "looked for " + "/".join(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))
