"""Label Studio's brush RLE: the mask format of its ``brushlabels`` regions (not COCO's RLE).

Label Studio stores a brush mask as the run-length encoding of the mask's RGBA bitmap,
``H x W x 4`` bytes flattened row by row, with the bit packing of thi.ng's ``rle-pack``:

- header: 32 bits ``num`` (number of values, ``H * W * 4``), 5 bits ``word_size - 1``, then
  four 4-bit ``rle_sizes[k] - 1``;
- then tokens until ``num`` values are out: 1 flag bit, 2 bits ``k``, ``rle_sizes[k]`` bits
  ``n`` (the token covers ``n + 1`` values), then either one ``word_size``-bit value repeated
  ``n + 1`` times (flag 1) or ``n + 1`` literal values (flag 0);
- zero bits to the next byte; the stream travels as a JSON list of byte values.

:func:`encode_brush_rle` writes exactly what label-studio-sdk's ``converter.brush.mask2rle``
writes for a ``mask * 255`` array (word size 8, run sizes 3, 4, 8, 16; every channel 255 on
the object, 0 elsewhere); :func:`decode_brush_rle` reads any stream of that format and takes
the alpha channel (``>= 128`` is the object: hand-drawn strokes are anti-aliased).
Tests check both against the SDK itself (``tests/labelstudio/test_brush_rle.py``). We do not
import the SDK: its dependencies (OpenCV 4.12, which needs numpy < 2.3) do not fit our pins.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from regcl.errors import DataError
from service.labelstudio.errors import LabelStudioError

__all__ = ["BrushRleError", "decode_brush_rle", "encode_brush_rle"]

_CHANNELS = 4
_WORD = 8
_RUN_SIZES = (3, 4, 8, 16)
_LONGEST = 2**16  # values one 16-bit run token covers at most
ALPHA_THRESHOLD = 128
"""Alpha at or above which a decoded pixel belongs to the mask."""


class BrushRleError(LabelStudioError, DataError):
    """A brush RLE that does not decode, or does not match the image it belongs to."""

    code, status, title = "invalid-brush-rle", 422, "Invalid brush RLE"


def _run_token(length: int, value: int) -> str:
    """The bits of one run of ``length`` (>= 1) equal values, as the SDK writes them."""
    if length == 1:
        return f"000000{value:08b}"
    if length <= 8:
        return f"100{length - 1:03b}{value:08b}"
    if length <= 16:
        return f"101{length - 1:04b}{value:08b}"
    if length <= 256:
        return f"110{length - 1:08b}{value:08b}"
    parts = []
    while length > _LONGEST:
        parts.append(f"111{_LONGEST - 1:016b}{value:08b}")
        length -= _LONGEST
    parts.append(f"111{length - 1:016b}{value:08b}")
    return "".join(parts)


def encode_brush_rle(mask: np.ndarray) -> list[int]:
    """A H x W mask (bool, or any dtype: non-zero is the object) as Label Studio brush RLE
    (a list of byte values), byte for byte what ``brush.mask2rle(mask * 255)`` returns."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.size == 0:
        raise BrushRleError(f"expected a non-empty H x W mask, got "
                            f"{getattr(mask, 'shape', type(mask).__name__)}")
    flat = np.ascontiguousarray(mask).reshape(-1) != 0
    count = flat.size * _CHANNELS
    if count >= 2**32:
        raise BrushRleError(f"mask of {flat.size} pixels is too large for a brush RLE")
    # Runs over pixels; each pixel is 4 equal values, so every run is 4 x its pixel run.
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], edges))
    lengths = np.diff(np.concatenate((starts, [flat.size]))) * _CHANNELS
    header = f"{count:032b}{_WORD - 1:05b}" + "".join(f"{s - 1:04b}" for s in _RUN_SIZES)
    body = "".join(_run_token(int(n), 255 if flat[s] else 0)
                   for s, n in zip(starts.tolist(), lengths.tolist()))
    bits = header + body
    bits += "0" * (8 - len(bits) % 8)  # the SDK always pads, a whole zero byte if need be
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


class _Bits:
    """A cursor over a bit string; reading past its end raises BrushRleError."""

    def __init__(self, data: bytes) -> None:
        self.text = format(int.from_bytes(data, "big"), f"0{len(data) * 8}b") if data else ""
        self.pos = 0

    def read(self, size: int) -> int:
        end = self.pos + size
        if end > len(self.text):
            raise BrushRleError("brush RLE ends in the middle of a value (truncated?)")
        value = int(self.text[self.pos:end], 2)
        self.pos = end
        return value


def _as_bytes(rle: object) -> bytes:
    if not isinstance(rle, Sequence) or isinstance(rle, str | bytes) or not rle:
        raise BrushRleError("brush RLE must be a non-empty list of byte values (0-255)")
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in rle):
        raise BrushRleError("brush RLE must be a non-empty list of byte values (0-255)")
    return bytes(rle)


def decode_brush_rle(rle: object, height: int, width: int) -> np.ndarray:
    """The H x W bool mask a Label Studio brush RLE encodes (alpha >= 128).

    Raises BrushRleError if ``rle`` is not a list of bytes, does not decode, or encodes
    another number of values than ``height x width x 4`` (checked before anything is
    allocated, so a lying header cannot make it allocate more)."""
    if height < 1 or width < 1:
        raise BrushRleError(f"invalid image size {width} x {height}")
    bits = _Bits(_as_bytes(rle))
    count = bits.read(32)
    expected = height * width * _CHANNELS
    if count != expected:
        raise BrushRleError(f"brush RLE holds {count} values, but a {width} x {height} image "
                            f"needs {expected} ({width} x {height} x 4): it belongs to another "
                            "image size")
    word = bits.read(5) + 1
    sizes = [bits.read(4) + 1 for _ in range(4)]
    out = np.zeros(count, dtype=np.uint32 if word > 16 else np.uint16 if word > 8 else np.uint8)
    i = 0
    while i < count:
        repeat = bits.read(1)
        j = i + 1 + bits.read(sizes[bits.read(2)])
        if j > count:
            raise BrushRleError(f"brush RLE runs past its {count} values")
        if repeat:
            out[i:j] = bits.read(word)
        else:
            out[i:j] = [bits.read(word) for _ in range(j - i)]
        i = j
    scale = (1 << word) - 1  # alpha relative to the word size (8 bits: 0..255)
    alpha = out.reshape(height, width, _CHANNELS)[:, :, 3].astype(np.uint64)
    return alpha * 255 >= ALPHA_THRESHOLD * scale
