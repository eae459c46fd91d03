"""What travels over HTTP, both ways: images to upload, masks (COCO RLE or PNG) and low-res
logits to decode, ``mask_input`` to encode, server-sent events to parse, dataset folders to
zip and adapter zips to unpack. Pillow and pycocotools are imported on use."""

from __future__ import annotations

import base64
import io
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from regcl.errors import ConfigError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "ImageLike",
    "ServerSentEvent",
    "decode_logits",
    "decode_mask",
    "encode_mask_input",
    "extract_zip",
    "image_bytes",
    "parse_sse",
    "zip_folder",
]

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, "PILImage"]
"""An image file's path, its bytes (PNG, JPEG, ...), an H x W x 3 (or H x W) uint8 array, or a
PIL image."""


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def image_bytes(image: ImageLike) -> bytes:
    """The encoded image file to send: bytes as given, a file's content, or arrays and PIL
    images as PNG (lossless, so the service sees exactly these pixels)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3
                                                                and image.shape[2] == 3)):
            raise ConfigError(f"an image array must be H x W x 3 (or H x W) uint8, got "
                              f"{image.dtype} of shape {image.shape}")
        return _png(np.ascontiguousarray(image))
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise ConfigError(f"not an image: {type(image).__name__} (give a path, bytes, a numpy "
                      "array or a PIL image)")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_mask(item: dict[str, Any]) -> np.ndarray:
    """One mask of a segmentation answer (``rle`` or ``png``) → H x W bool."""
    if item.get("rle") is not None:
        import pycocotools.mask as mask_utils

        rle = item["rle"]
        return mask_utils.decode({"size": list(rle["size"]),
                                  "counts": rle["counts"].encode("ascii")}).astype(bool)
    if item.get("png") is not None:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["png"])))) > 127
    raise ValueError("the mask has neither 'rle' nor 'png'")


def decode_logits(text: str) -> np.ndarray:
    """``low_res_logits`` (base64 little-endian float32, side x side) → side x side float32."""
    values = np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)
    side = round(values.size ** 0.5)
    if side * side != values.size:
        raise ValueError(f"low_res_logits of {values.size} values is not square")
    return values.reshape(side, side)


def encode_mask_input(logits: Any) -> str:
    """``mask_input`` to send: side x side (or 1 x side x side) float logits, e.g. a
    :attr:`~regcl.client.models.Mask.low_res_logits`, or a ``Mask`` that has them."""
    logits = getattr(logits, "low_res_logits", logits)
    if logits is None:
        raise ConfigError("mask_input: this mask has no low_res_logits (segment with "
                          "return_logits=True)")
    array = np.asarray(logits, dtype="<f4")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ConfigError(f"mask_input must be side x side logits, got shape {array.shape}")
    return b64(np.ascontiguousarray(array).tobytes())


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None = None


def parse_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent | None]:
    """Server-sent events from a stream's lines; ``None`` for each comment (keep-alive), so a
    reader can check its clock between events."""
    event, data, event_id = "message", [], None
    for line in lines:
        if not line:
            if data:
                yield ServerSentEvent(event, "\n".join(data), event_id)
            event, data, event_id = "message", [], None
        elif line.startswith(":"):
            yield None
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id":
                event_id = value
    if data:
        yield ServerSentEvent(event, "\n".join(data), event_id)


def zip_folder(folder: Path) -> bytes:
    """A dataset folder (``images/`` + ``masks/``, or ``annotations.json`` + ``images/``) as
    zip bytes; files only, paths relative to ``folder``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                zf.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def extract_zip(data: bytes, directory: Path) -> list[Path]:
    """Unpack a downloaded zip into ``directory``, refusing any entry that would land outside
    it; the files written."""
    root = directory.resolve()
    written = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            target = (root / info.filename).resolve()
            if info.is_dir():
                continue
            if root not in target.parents:
                raise ValueError(f"zip entry {info.filename!r} would land outside {root}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
            written.append(target)
    return written
