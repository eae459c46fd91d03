"""The prompt encoder + mask decoder as ONNX, for clients that decode on their own side.

:func:`export_decoder_onnx` wraps a SAM in segment-anything's own ONNX wrapper
(:class:`segment_anything.utils.onnx.SamOnnxModel`, with its crop fixed for every aspect
ratio: see :func:`_wrapper`) and exports it as segment-anything's
``scripts/export_onnx_model.py`` does (the TorchScript exporter, dynamic point count), with
``return_single_mask=False``: all the mask decoder's masks come back, index 0 the single-mask
output and 1-3 the multimask ones, so a client picks exactly what ``SamPredictor.predict``
(``multimask_output`` False / True) would.

Inputs (``B = 1``; ``N`` points, coordinates in the model's input frame, i.e. after
``ResizeLongestSide.apply_coords``; a point prompt without a box ends with a padding point
``(0, 0)`` labelled -1, a box is two points labelled 2 and 3):

- ``image_embeddings``: 1 x C x h x w float32 (the image encoder's output);
- ``point_coords``: 1 x N x 2 float32 (x, y); ``point_labels``: 1 x N float32;
- ``mask_input``: 1 x 1 x 4h x 4w float32 low-res logits; ``has_mask_input``: 1 float32 (0/1);
- ``orig_im_size``: 2 float32 (H, W of the original image).

Outputs: ``masks`` 1 x 4 x H x W float32 logits at the original size (threshold at 0),
``iou_predictions`` 1 x 4 float32, ``low_res_masks`` 1 x 4 x 4h x 4w float32.

Needs the ``onnx`` package at call time (torch's exporter imports it); nothing is imported or
built at module import.
"""

from __future__ import annotations

import copy
import io
import warnings

import torch
from segment_anything.modeling import Sam
from torch import nn
from torch.nn import functional as F

__all__ = ["DECODER_INPUTS", "DECODER_OUTPUTS", "EXPORT_REVISION", "OPSET",
           "export_decoder_onnx"]

DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input",
                  "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
OPSET = 17
EXPORT_REVISION = 2
"""Bumped whenever the exported graph changes (names cached files: an old one is not reused).
2: the crop fix of :func:`_wrapper`."""


class _EncoderSize(nn.Module):
    """Stands for the image encoder in the wrapper, which reads only its ``img_size``."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size


class _DecoderOnly(nn.Module):
    """Private copies of ``sam``'s prompt encoder and mask decoder (what the wrapper uses), so
    the export neither touches the served model nor copies its image encoder."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = _EncoderSize(sam.image_encoder.img_size)
        self.prompt_encoder = copy.deepcopy(sam.prompt_encoder).eval()
        self.mask_decoder = copy.deepcopy(sam.mask_decoder).eval()
        self.mask_threshold = sam.mask_threshold


def _wrapper(sam: Sam) -> nn.Module:
    """segment-anything's ``SamOnnxModel`` on :class:`_DecoderOnly`, with one fix: its crop
    to the resized image's size converts tensors to Python ints, which the tracer freezes to
    the example input's size (1500 x 2250, a 2:3 image); every other aspect ratio then gets
    a wrongly cropped, stretched mask. Here the crop bounds stay tensors, so the graph
    computes them from ``orig_im_size``."""
    from segment_anything.utils.onnx import SamOnnxModel

    class _Wrapper(SamOnnxModel):
        def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor
                                ) -> torch.Tensor:
            masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear",
                                  align_corners=False)
            prepadded = self.resize_longest_image_size(orig_im_size, self.img_size)
            masks = masks[..., : prepadded[0], : prepadded[1]]
            size = orig_im_size.to(torch.int64)
            return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear",
                                 align_corners=False)

    return _Wrapper(_DecoderOnly(sam), return_single_mask=False).eval()


def export_decoder_onnx(sam: Sam, opset: int = OPSET) -> bytes:
    """``sam``'s prompt encoder and mask decoder as an ONNX model (the bytes of the file); see
    the module docstring for its inputs and outputs. ``sam`` is read, not changed: its
    prompt encoder and mask decoder are copied first (it may keep serving meanwhile)."""
    wrapper = _wrapper(sam)
    embed_dim = sam.prompt_encoder.embed_dim
    side = sam.prompt_encoder.image_embedding_size
    mask_side = sam.prompt_encoder.mask_input_size
    dummy = {
        "image_embeddings": torch.randn(1, embed_dim, *side, dtype=torch.float),
        "point_coords": torch.randint(0, sam.image_encoder.img_size, (1, 5, 2),
                                      dtype=torch.float),
        "point_labels": torch.randint(0, 4, (1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, *mask_side, dtype=torch.float),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
    }
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python ints
        torch.onnx.export(wrapper, tuple(dummy.values()), buffer, export_params=True,
                          verbose=False, opset_version=opset, do_constant_folding=True,
                          input_names=list(DECODER_INPUTS), output_names=list(DECODER_OUTPUTS),
                          dynamic_axes={"point_coords": {1: "num_points"},
                                        "point_labels": {1: "num_points"}},
                          dynamo=False)
    return buffer.getvalue()
