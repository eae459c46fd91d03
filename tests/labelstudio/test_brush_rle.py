"""Label Studio's brush RLE: our codec against label-studio-sdk's own converter (run in Label
Studio's venv), both ways, on random masks of odd sizes and on the edge cases, and the refusals
of malformed input."""

from __future__ import annotations

import numpy as np
import pytest

from service.labelstudio.brush_rle import BrushRleError, decode_brush_rle, encode_brush_rle
from tests.labelstudio.ls_support import sdk_decode, sdk_encode


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    masks = []
    for height, width in [(1, 1), (1, 7), (5, 3), (17, 31), (64, 64), (97, 130), (3, 301)]:
        masks.append(rng.random((height, width)) < 0.5)  # noise: runs of length 1
        blob = np.zeros((height, width), dtype=bool)
        blob[height // 4: 3 * height // 4 + 1, width // 3: 2 * width // 3 + 1] = True
        masks.append(blob)
    masks.append(np.zeros((40, 50), dtype=bool))
    masks.append(np.ones((40, 50), dtype=bool))
    big = np.zeros((300, 300), dtype=bool)  # runs over 65536 values (the 16-bit token split)
    big[150:, :] = True
    masks.append(big)
    return masks


def test_encode_is_byte_equal_to_the_sdk() -> None:
    masks = _masks()
    ours = [encode_brush_rle(m) for m in masks]
    assert ours == sdk_encode(masks)


def test_decode_reads_the_sdks_encoding_and_the_sdk_reads_ours() -> None:
    masks = _masks()
    sizes = [m.shape for m in masks]
    for mask, rle in zip(masks, sdk_encode(masks), strict=True):
        np.testing.assert_array_equal(decode_brush_rle(rle, *mask.shape), mask)
    decoded = sdk_decode([encode_brush_rle(m) for m in masks], sizes)
    for mask, back in zip(masks, decoded, strict=True):
        np.testing.assert_array_equal(back, mask)


def test_decode_takes_alpha_at_or_above_half() -> None:
    # A hand-drawn stroke: anti-aliased alpha. Built with the SDK's own encoder semantics
    # (literal values), then read back: only alpha >= 128 is the object.
    from service.labelstudio import brush_rle

    alpha = np.array([0, 127, 128, 255], dtype=np.uint8)
    values = np.repeat(alpha, 4)
    bits = f"{values.size:032b}{7:05b}" + "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))
    bits += "".join(f"000000{v:08b}" for v in values)  # literal tokens of one value
    bits += "0" * (8 - len(bits) % 8)
    rle = list(int(bits, 2).to_bytes(len(bits) // 8, "big"))
    assert brush_rle.decode_brush_rle(rle, 1, 4).tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("rle", [
    [], "abc", [1, 2, 300], [True, 0, 0], None, [0, 0],
    [0, 0, 0, 16, 57, 27, 254],  # a header promising 16 values, then nothing
])
def test_malformed_rle_is_refused(rle: object) -> None:
    with pytest.raises(BrushRleError):
        decode_brush_rle(rle, 2, 2)


def test_rle_of_another_size_is_refused_before_allocating() -> None:
    rle = encode_brush_rle(np.ones((4, 4), dtype=bool))
    with pytest.raises(BrushRleError, match="another image size"):
        decode_brush_rle(rle, 5, 4)
    huge = [255, 255, 255, 252, *rle[4:]]  # a header claiming 4 G values
    with pytest.raises(BrushRleError):
        decode_brush_rle(huge, 4, 4)


def test_a_run_past_the_end_is_refused() -> None:
    rle = encode_brush_rle(np.ones((2, 2), dtype=bool))  # one run of 16 values
    header = list((12).to_bytes(4, "big"))  # claims 12: the run overshoots
    with pytest.raises(BrushRleError):
        decode_brush_rle(header + rle[4:], 1, 3)


def test_encode_refuses_what_is_no_mask() -> None:
    for bad in (np.zeros((0, 3), dtype=bool), np.zeros(5, dtype=bool), [[1, 0]]):
        with pytest.raises(BrushRleError):
            encode_brush_rle(bad)  # type: ignore[arg-type]
