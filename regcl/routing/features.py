"""What the domain router reads of an image: the first two moments of its tokens at the input
of the first adapted linear layer (``qkv`` of the first adapted encoder block, after that
block's ``norm1``), the same place the adapters' Gram statistics were collected.

An image's N tokens x_1..x_N (D each) are summarised by ``second = Σ x xᵀ / N`` (D x D),
``first = Σ x / N`` (D) and N. Token padding counts the way it counts in the statistics: a
windowed block pads its token grid with zeros up to a multiple of the window size before
``qkv`` sees it, so those zero tokens are in N there and are counted here too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import Tensor

from regcl.errors import RoutingError

__all__ = ["first_layer_key", "first_layer_moments", "token_moments", "tokens_per_image"]

_BLOCK = re.compile(r"\.blocks\.(\d+)\.")
_A_WEIGHT = ".lora_A.weight"


def token_moments(tokens: Tensor, *, count: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Moments of each image's tokens, in float64.

    tokens: B x N x D or B x H x W x D (one image: 1 x N x D).
    count:  the N to divide by, when zero tokens that are not in ``tokens`` count too
            (window padding); default: the number of tokens given.
    Returns ``(second B x D x D, first B x D, counts B)``.
    """
    if tokens.dim() not in (3, 4):
        raise RoutingError(
            f"tokens must be B x N x D or B x H x W x D, got shape {tuple(tokens.shape)}"
        )
    if not tokens.is_floating_point() or not bool(torch.isfinite(tokens).all()):
        raise RoutingError("tokens must be finite floating-point values")
    x = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]).to(torch.float64)
    n = x.shape[1] if count is None else count
    if n < 1 or n < x.shape[1]:
        raise RoutingError(f"count must be at least the {x.shape[1]} tokens given, got {n}")
    second = x.transpose(1, 2) @ x / n
    first = x.sum(1) / n
    return second, first, torch.full((x.shape[0],), n, dtype=torch.int64)


def first_layer_moments(block: torch.nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Moments of the input of ``block.attn.qkv`` for tokens entering ``block``.

    block:  the first adapted ``Block`` of a segment-anything ``ImageEncoderViT``
            (``encoder.blocks[first]``); its ``norm1`` and ``window_size`` are used.
    tokens: B x H x W x C, the block's input (``regcl.models.encoder.encode_prefix``).
    Returns ``(second B x C x C, first B x C, counts B)`` as :func:`token_moments`, with the
    zero tokens of window padding counted as the adapter statistics count them.
    """
    if tokens.dim() != 4:
        raise RoutingError(f"tokens must be B x H x W x C, got shape {tuple(tokens.shape)}")
    with torch.no_grad():
        x = block.norm1(tokens)
    h, w = x.shape[1], x.shape[2]
    window = int(getattr(block, "window_size", 0) or 0)
    padded = (math.ceil(h / window) * window, math.ceil(w / window) * window) if window else (h, w)
    return token_moments(x, count=padded[0] * padded[1])


def tokens_per_image(encoder: torch.nn.Module, block: int) -> int:
    """Tokens one image puts through ``encoder.blocks[block]``'s ``qkv`` as the statistics
    count them: the patch grid, padded up to the block's window (zero tokens included)."""
    size = int(encoder.img_size)
    patch = int(encoder.patch_embed.proj.kernel_size[0])
    grid = size // patch
    window = int(getattr(encoder.blocks[block], "window_size", 0) or 0)
    side = math.ceil(grid / window) * window if window else grid
    return side * side


def first_layer_key(keys: Iterable[str]) -> str:
    """The LoRA weight key of the first adapted linear among adapter or statistics ``keys``.

    The lowest encoder block with a ``lora_A`` wins; within it ``attn.qkv`` (whose input is
    the block's normalised input), else the first key in sorted order. Keys may carry a
    statistics suffix (``.gram``, ``.count``, ``.mean``); the weight key is returned.
    """
    found: dict[str, int] = {}
    for key in keys:
        cut = key.find(_A_WEIGHT)
        match = _BLOCK.search(key)
        if cut < 0 or match is None:
            continue
        found[key[: cut + len(_A_WEIGHT)]] = int(match.group(1))
    if not found:
        raise RoutingError("no LoRA lora_A weight of an encoder block among the keys given")
    lowest = min(found.values())
    candidates = sorted(k for k, block in found.items() if block == lowest)
    qkv = [k for k in candidates if ".attn.qkv." in k]
    return (qkv or candidates)[0]
