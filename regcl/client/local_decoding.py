"""Masks decoded on the client's side, as the web page does it with onnxruntime-web.

The service sends an image's embedding once (:meth:`regcl.client.Client.embedding`) and the
prompt encoder + mask decoder as ONNX (:meth:`regcl.client.Client.decoder_onnx`); every prompt
after that is decoded here, without a request. :func:`decoder_inputs` builds the ONNX model's
inputs from a prompt in image pixels exactly as ``SamPredictor.predict`` transforms it (the
same arithmetic as ``service/static/js/local_decoder.js``); :class:`LocalDecoder` runs them
with onnxruntime (imported when one is made).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from regcl.client.models import Embedding

__all__ = ["LocalDecoder", "LocalMasks", "decoder_inputs"]


def decoder_inputs(embedding: Embedding, points: Any = None, labels: Any = None,
                   box: Any = None, mask_input: np.ndarray | None = None
                   ) -> dict[str, np.ndarray]:
    """The decoder's inputs for one prompt in original-image pixels: points N x 2 (x, y)
    with labels N (1 / 0; default all 1), box ``[x0, y0, x1, y1]``, mask_input h x w (or
    1 x h x w) low-res logits of an earlier answer."""
    (height, width), (in_h, in_w) = embedding.original_size, embedding.input_size
    scale = np.array([in_w / width, in_h / height], dtype=np.float64)
    coords: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    if points is not None:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        coords.append(pts)
        codes.append(np.ones(len(pts)) if labels is None
                     else np.asarray(labels, dtype=np.float64).reshape(-1))
    if box is not None:
        coords.append(np.asarray(box, dtype=np.float64).reshape(2, 2))
        codes.append(np.array([2.0, 3.0]))
    else:  # segment-anything's prompt encoder pads a prompt without a box with one point
        coords.append(np.zeros((1, 2)))
        codes.append(np.array([-1.0]))
    point_coords = np.concatenate(coords) * scale
    side = [4 * s for s in embedding.features.shape[-2:]]
    has_mask = mask_input is not None
    mask = (np.asarray(mask_input, dtype=np.float32).reshape(1, 1, *side) if has_mask
            else np.zeros((1, 1, *side), dtype=np.float32))
    return {"image_embeddings": np.ascontiguousarray(embedding.features, dtype=np.float32),
            "point_coords": point_coords[None].astype(np.float32),
            "point_labels": np.concatenate(codes)[None].astype(np.float32),
            "mask_input": mask,
            "has_mask_input": np.array([1.0 if has_mask else 0.0], dtype=np.float32),
            "orig_im_size": np.array([height, width], dtype=np.float32)}


@dataclass(frozen=True)
class LocalMasks:
    """masks: N x H x W bool (N = 3 with multimask, else 1, as ``SamPredictor.predict``);
    scores: N float32; low_res_logits: N x h x w float32 (pass one back as mask_input)."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray


class LocalDecoder:
    """An onnxruntime session of ``decoder.onnx`` (its bytes)."""

    def __init__(self, model: bytes, threads: int = 1) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(model, options,
                                                     providers=["CPUExecutionProvider"])

    def decode(self, embedding: Embedding, points: Any = None, labels: Any = None,
               box: Any = None, mask_input: np.ndarray | None = None,
               multimask: bool = True) -> LocalMasks:
        """Masks for one prompt (arguments as :func:`decoder_inputs`)."""
        masks, scores, low = self._session.run(
            None, decoder_inputs(embedding, points, labels, box, mask_input))
        pick = slice(1, None) if multimask else slice(0, 1)  # as SAM's MaskDecoder
        return LocalMasks(masks[0, pick] > 0.0, scores[0, pick], low[0, pick])
