"""Reading images and masks from files or bytes into plain numpy arrays.

Shared by every file-based dataset (:mod:`regcl.data.folders`, :mod:`regcl.data.coco`) and by
the service for uploads. Every failure — missing file, corrupt bytes, unsupported format or
mode, too many pixels — is raised as :class:`~regcl.errors.DataError` naming the source.

Conversion rules (the same for files and bytes):

- Images become H x W x 3 uint8 RGB. Grayscale, 1-bit, palette and CMYK are converted by PIL;
  alpha is discarded (colour channels kept as stored, not composited). 16-bit and 32-bit integer
  grayscale ("I;16*", "I") is read as 16-bit and scaled to 8 bits (v * 255 / 65535, rounded);
  floating-point images ("F") are refused because they have no agreed range.
- Masks become H x W bool. Colour masks (RGB, palette, with or without alpha) are reduced to one
  channel by the maximum over the colour channels; alpha is discarded. The threshold then
  depends on the largest value ``m`` in the mask: ``m <= 1`` means a 0/1 mask (foreground
  ``> 0``), ``m <= 255`` an 8-bit mask (foreground ``> 127``, robust to JPEG noise), larger
  values a 16-bit mask (foreground ``> 32767``).
- EXIF orientation is not applied: masks are drawn on the stored pixels, and rotating only the
  image (JPEG) but not its mask (PNG) would misalign the pair.
- Only PNG, JPEG (and MPO, the multi-picture JPEG that cameras write), BMP, TIFF and WebP are
  decoded; other formats PIL knows (EPS, for example, runs Ghostscript) are refused because
  uploads are untrusted. Multi-frame files give their first frame.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from regcl.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest image (width x height) decoded by default: 64 megapixels, ~192 MB as RGB uint8."""

ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
"""PIL format names that may be decoded (PIL's JPEG opener also reads MPO files)."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_COLOUR_MASK_MODES = frozenset({"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"})


def check_max_pixels(max_pixels: int) -> int:
    """Return ``max_pixels`` if it is a positive int, else raise :class:`ConfigError`."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ConfigError(f"max_pixels must be a positive int, got {max_pixels!r}")
    return max_pixels


def read_image_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB.

    Returns an H x W x 3 uint8 array. Raises DataError naming ``path`` on any failure, including
    an image larger than ``max_pixels`` (checked from the header, before decoding).
    """
    path = Path(path)
    return _decode(path, str(path), max_pixels, _to_rgb)


def read_mask(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a mask file and binarise it by the module's threshold rule.

    Returns an H x W bool array, True on the object. Raises DataError naming ``path``.
    """
    path = Path(path)
    return _decode(path, str(path), max_pixels, _to_mask)


def decode_image_bytes(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, name: str = "uploaded image"
) -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, ...) held in memory, e.g. an upload.

    Returns an H x W x 3 uint8 RGB array. Raises DataError mentioning ``name``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DataError(f"{name}: expected bytes, got {type(data).__name__}")
    return _decode(bytes(data), name, max_pixels, _to_rgb)


def decode_mask_bytes(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, name: str = "uploaded mask"
) -> np.ndarray:
    """Decode an encoded mask image (e.g. a PNG upload) and binarise it.

    Returns an H x W bool array. Raises DataError mentioning ``name``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DataError(f"{name}: expected bytes, got {type(data).__name__}")
    return _decode(bytes(data), name, max_pixels, _to_mask)


def _decode(
    source: Path | bytes,
    label: str,
    max_pixels: int,
    to_array: Callable[[Image.Image], np.ndarray],
) -> np.ndarray:
    """Open ``source``, refuse it if too large, decode it and convert it with ``to_array``."""
    check_max_pixels(max_pixels)
    if isinstance(source, bytes) and not source:
        raise DataError(f"{label}: no bytes to decode")
    pil_cap = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; make the warning an error.
            # Our own header check below is the real guard (catch_warnings is process-global
            # and not thread-safe), so when the caller allows more than PIL would, silence it.
            if pil_cap is not None and max_pixels <= pil_cap:
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            else:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            fp = io.BytesIO(source) if isinstance(source, bytes) else source
            with Image.open(fp, formats=ALLOWED_FORMATS) as image:
                width, height = image.size
                if width <= 0 or height <= 0:
                    raise DataError(f"{label}: image has no pixels ({width} x {height})")
                if width * height > max_pixels:
                    raise DataError(
                        f"{label}: {width} x {height} = {width * height} pixels exceeds "
                        f"max_pixels={max_pixels} (refused as a possible decompression bomb)"
                    )
                image.load()
                array = to_array(image)
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{label}: file not found") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{label}: refused as a possible decompression bomb ({exc})") from exc
    except MemoryError:
        raise
    except Exception as exc:
        # Corrupt files make PIL's plugins raise many kinds (OSError, SyntaxError, struct.error,
        # IndexError, ...); for untrusted input they all mean "not a readable image".
        raise DataError(f"{label}: cannot read image ({type(exc).__name__}: {exc})") from exc
    return array


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image to H x W x 3 uint8 RGB."""
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = _sixteen_to_eight_bit(np.asarray(image))
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode == "F":
        raise ValueError("floating-point images (mode 'F') are not supported")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def _sixteen_to_eight_bit(values: np.ndarray) -> np.ndarray:
    """Scale H x W 16-bit values (any integer dtype, clipped to 0..65535) to H x W uint8."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _to_mask(image: Image.Image) -> np.ndarray:
    """Reduce a loaded PIL image to one channel and binarise it to H x W bool."""
    if image.mode == "1":
        return np.array(image, dtype=bool)
    if image.mode == "F":
        raise ValueError("floating-point masks (mode 'F') are not supported")
    if image.mode in _COLOUR_MASK_MODES:
        # Palette masks are judged by their colours, not their indices; alpha is dropped.
        values = np.asarray(image.convert("RGB")).max(axis=2)
    elif image.mode == "LA":
        values = np.asarray(image.getchannel("L"))
    elif image.mode in _SIXTEEN_BIT_MODES or image.mode == "L":
        values = np.asarray(image)
    else:
        values = np.asarray(image.convert("L"))
    return binarise_mask(values)


def binarise_mask(values: np.ndarray) -> np.ndarray:
    """Binarise an H x W integer mask by the module's rule (0/1, 8-bit or 16-bit by its max).

    Returns H x W bool, True on the object.
    """
    if values.size == 0:
        return np.zeros(values.shape, dtype=bool)
    top = int(values.max())
    if top <= 1:
        threshold = 0
    elif top <= 255:
        threshold = 127
    else:
        threshold = 32767
    return np.ascontiguousarray(values > threshold)
