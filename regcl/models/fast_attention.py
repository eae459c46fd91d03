"""segment-anything's ViT attention on ``F.scaled_dot_product_attention``.

The original :class:`segment_anything.modeling.image_encoder.Attention` materialises the
attention map, adds the decomposed relative-position bias to it (``add_decomposed_rel_pos``)
and runs an explicit softmax. Here the same bias, ``rel_h[..., :, None] + rel_w[..., None, :]``
(B·heads x q_h x q_w x k_h x k_w), is passed to SDPA as its additive ``attn_mask``, so fused
kernels (flash / memory-efficient on GPU, the fused CPU kernel) do the rest. The arithmetic is
the same up to rounding: fp32 agrees with the original to ~1e-5, bf16 to bf16's precision
(``tests/test_fast_attention.py`` states the tolerances on the masks).

:func:`use_sdpa_attention` switches an encoder's blocks in place by changing their class
(weights and state-dict keys are untouched); :func:`use_original_attention` switches back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos

__all__ = ["SDPAAttention", "rel_pos_bias", "use_original_attention", "use_sdpa_attention"]


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 size: tuple[int, int]) -> torch.Tensor:
    """Additive attention bias of the decomposed relative positions (MViTv2), as
    ``add_decomposed_rel_pos`` adds it for queries and keys on the same h x w grid.

    Args:
        q: B x heads x h·w x C queries (unscaled, as the original uses them).
        rel_pos_h, rel_pos_w: (2h-1) x C and (2w-1) x C embeddings.
    Returns:
        B x heads x h·w x h·w bias in ``q``'s dtype.
    """
    h, w = size
    b, heads, _, dim = q.shape
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)  # h x h x C
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)  # w x w x C
    r_q = q.reshape(b, heads, h, w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # b x n x h x w x kh x kw
    return bias.reshape(b, heads, h * w, h * w)


class SDPAAttention(Attention):
    """:class:`Attention` whose forward runs ``F.scaled_dot_product_attention`` (same
    parameters, same scale ``head_dim ** -0.5``, relative positions as ``attn_mask``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        # qkv: 3 x B x heads x h·w x C
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)) if self.use_rel_pos \
            else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)


def _attentions(encoder: ImageEncoderViT) -> list[Attention]:
    return [m for m in encoder.modules() if isinstance(m, Attention)]


def use_sdpa_attention(encoder: ImageEncoderViT) -> int:
    """Make every attention of ``encoder`` an :class:`SDPAAttention` (in place); returns how
    many were switched."""
    switched = 0
    for module in _attentions(encoder):
        if type(module) is Attention:
            module.__class__ = SDPAAttention
            switched += 1
    return switched


def use_original_attention(encoder: ImageEncoderViT) -> int:
    """Undo :func:`use_sdpa_attention`; returns how many were switched back."""
    switched = 0
    for module in _attentions(encoder):
        if type(module) is SDPAAttention:
            module.__class__ = Attention
            switched += 1
    return switched
