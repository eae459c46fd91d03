"""Builders for the SAM models regcl serves and adapts, in a named registry.

``vit_b``, ``vit_l`` and ``vit_h`` are segment-anything's own architectures and load official
checkpoint files that users bring. ``tiny`` is a small SAM assembled from the same modules at
256 px for CPU work, demos and tests; its weights ship with the package (``weights/``) and are
made by ``regcl pretrain``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from regcl.errors import CheckpointError, CheckpointNotFoundError, ConfigError

logger = logging.getLogger(__name__)

TINY_CHECKPOINT = Path(__file__).parent / "weights" / "sam_tiny.safetensors"


@dataclass(frozen=True)
class SamSpec:
    """Architecture of one SAM variant (segment-anything's ``_build_sam`` arguments)."""

    image_size: int
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    window_size: int
    prompt_embed_dim: int
    decoder_mlp_dim: int
    decoder_num_heads: int
    iou_head_hidden_dim: int = 256
    patch_size: int = 16

    @property
    def mask_input_side(self) -> int:
        """Side of the low-res mask logits (``mask_input``): 4 x the image embedding's side."""
        return 4 * (self.image_size // self.patch_size)


SAM_SPECS: dict[str, SamSpec] = {
    "vit_h": SamSpec(1024, 1280, 32, 16, (7, 15, 23, 31), 14, 256, 2048, 8),
    "vit_l": SamSpec(1024, 1024, 24, 16, (5, 11, 17, 23), 14, 256, 2048, 8),
    "vit_b": SamSpec(1024, 768, 12, 12, (2, 5, 8, 11), 14, 256, 2048, 8),
    # 3.8 M parameters; 16 x 16 image embedding like SAM's 64 x 64 at a sixteenth of the tokens.
    "tiny": SamSpec(256, 192, 6, 3, (2, 5), 8, 128, 512, 4, iou_head_hidden_dim=128),
}


def build_sam_from_spec(spec: SamSpec) -> Sam:
    """Assemble an untrained ``Sam`` from segment-anything's modules, in eval mode."""
    embedding_size = spec.image_size // spec.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=spec.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.encoder_global_attn_indexes,
            window_size=spec.window_size,
            out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(spec.image_size, spec.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=spec.prompt_embed_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_num_heads,
            ),
            transformer_dim=spec.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint without ever unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; anything else (the official ``.pth``
    files) with ``torch.load(weights_only=True)``, which refuses code and arbitrary classes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle refused, truncated download...
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} is not a flat state dict of tensors")
    return state


def load_weights(sam: Sam, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load a full state dict into ``sam``, refusing missing/unexpected keys and bad shapes."""
    own = sam.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with wrong shape (e.g. {sorted(wrong)[:3]})")
        raise CheckpointError(f"{source} does not fit this model: " + "; ".join(parts))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source} has non-finite values in {bad[:3]}")
    sam.load_state_dict(state)


def build_sam(name: str = "tiny", checkpoint: str | Path | None = None) -> Sam:
    """Build a SAM by registry name and load its weights.

    Args:
        name: one of :data:`sam_model_registry` (``tiny``, ``vit_b``, ``vit_l``, ``vit_h``).
        checkpoint: weights file. Optional for ``tiny`` (the shipped weights are used);
            required for the official models, whose weights users bring.
    Returns:
        a ``segment_anything.modeling.Sam`` in eval mode on the CPU.
    """
    if name not in SAM_SPECS:
        raise ConfigError(f"unknown model {name!r}; known: {sorted(SAM_SPECS)}")
    sam = build_sam_from_spec(SAM_SPECS[name])
    if checkpoint is None:
        if name != "tiny":
            raise ConfigError(
                f"model {name!r} needs a checkpoint file (official SAM weights, e.g. "
                "sam_vit_b_01ec64.pth); regcl cannot download it for you"
            )
        checkpoint = TINY_CHECKPOINT
    load_weights(sam, read_state_dict(checkpoint), source=str(checkpoint))
    logger.info("loaded %s from %s", name, checkpoint)
    return sam


def _builder(name: str):
    def build(checkpoint: str | Path | None = None) -> Sam:
        return build_sam(name, checkpoint)

    build.__name__ = f"build_sam_{name}"
    return build


sam_model_registry = {name: _builder(name) for name in SAM_SPECS}


def model_fingerprint(sam: torch.nn.Module) -> str:
    """A short, stable hash of a model's base weights (adapters record which base they fit)."""
    digest = hashlib.sha256()
    for key, value in sorted(sam.state_dict().items()):
        if "lora_" in key:
            continue
        # PEFT wraps adapted linears in place (``qkv`` → ``qkv.base_layer``) and a PeftModel
        # prefixes every key: hash the base model's own names so wrapping does not change it.
        key = key.replace(".base_layer", "").removeprefix("base_model.model.")
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
