"""SAM models: builders (registry by name), checkpoint I/O and batched mask decoding."""

from regcl.models.build import (
    SAM_SPECS,
    TINY_CHECKPOINT,
    SamSpec,
    build_sam,
    build_sam_from_spec,
    load_weights,
    model_fingerprint,
    read_state_dict,
    sam_model_registry,
)
from regcl.models.decoding import predict_masks_batched, preprocess, upscale_logits

__all__ = [
    "SAM_SPECS",
    "TINY_CHECKPOINT",
    "SamSpec",
    "build_sam",
    "build_sam_from_spec",
    "load_weights",
    "model_fingerprint",
    "predict_masks_batched",
    "preprocess",
    "read_state_dict",
    "sam_model_registry",
    "upscale_logits",
]
