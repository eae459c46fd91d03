"""Core Space merging of LoRA adapters (Panariello, Marczak et al., "Accurate and Efficient
Low-Rank Model Merging in Core Space", NeurIPS 2025), implemented from the paper's description.

For one adapted linear with T LoRA pairs (A_t: r x in, B_t: out x r):

1. Reference bases from the stacked factors: ``V_A`` (k_A x in), the right singular vectors of
   ``[A_1; …; A_T]`` (Tr x in), and ``U_B`` (out x k_B), the left singular vectors of
   ``[B_1 … B_T]`` (out x Tr), keeping the directions with non-zero singular value.
2. Each task's *core matrix* ``M_t = U_Bᵀ B_t A_t V_Aᵀ`` (k_B x k_A, at most Tr x Tr). The
   projection is lossless: every row of A_t lies in the span of V_A and every column of B_t in
   that of U_B, so ``U_B M_t V_A = B_t A_t`` exactly.
3. Merge the small core matrices with an ordinary method (TIES, task arithmetic, mean, or the
   isotropic merge Iso-C: the sum with its singular values replaced by their mean).
4. Back to the full space, ``ΔW = U_B M̄ V_A``, which this project then re-factors to the
   adapters' own rank r (the merged adapter keeps its size; the SVD is taken in the core
   space, where U_B and V_A are orthonormal, so it is the SVD of ΔW).

Linear merges (task arithmetic, mean) in core space equal the same merge of the full products
B_t A_t; non-linear ones (TIES, Iso-C) act on a Tr x Tr matrix instead of out x in. The bases
depend on every adapter, so the method needs all of them at once (no constant-memory state).
Its parameters are :class:`~regcl.merging.catalogue.CoreSpaceParams`; the whole-adapter merge
is registered as ``core_space`` in :mod:`regcl.merging.methods`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from regcl.errors import ConfigError, MergeError
from regcl.merging.catalogue import CORE_INNER_METHODS
from regcl.merging.merge_utils import product_delta, ties_merge

__all__ = ["CORE_INNER_METHODS", "core_bases", "core_space_merge"]

_SUPPORT_TOL = 1e-10  # singular values below this fraction of the largest are not directions


def _support(s: Tensor) -> int:
    """How many singular values (descending) are non-zero relative to the largest (≥ 1)."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 1
    return max(1, int((s > _SUPPORT_TOL * s[0]).sum()))


def core_bases(pairs: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Reference bases of T LoRA pairs ``(A_t r x in, B_t out x r)``, float64.

    Returns ``(U_B out x k_B, V_A k_A x in)``: orthonormal columns / rows spanning every B_t's
    columns and every A_t's rows (k ≤ T·r).
    """
    a_stack = torch.cat([a.to(torch.float64) for a, _ in pairs], dim=0)  # Tr x in
    b_stack = torch.cat([b.to(torch.float64) for _, b in pairs], dim=1)  # out x Tr
    _, s_a, vh_a = torch.linalg.svd(a_stack, full_matrices=False)
    u_b, s_b, _ = torch.linalg.svd(b_stack, full_matrices=False)
    return u_b[:, : _support(s_b)], vh_a[: _support(s_a)]


def _inner_merge(cores: Sequence[Tensor], inner: str, density: float, scale: float) -> Tensor:
    if inner == "ties":
        return ties_merge(cores, density=density, scale=scale)
    total = torch.stack(cores).sum(0)
    if inner == "task_arithmetic":
        return scale * total
    if inner == "mean":
        return total / len(cores)
    if inner == "iso":
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        return scale * (u * s.mean()) @ vh
    raise ConfigError(f"unknown core-space inner method {inner!r}")


def core_space_merge(
    pairs: Sequence[tuple[Tensor, Tensor]],
    *,
    rank: int,
    inner: str = "ties",
    density: float = 0.2,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Merges T LoRA pairs in core space; returns ``(A rank x in, B out x rank)``.

    pairs: T pairs ``(A_t r x in, B_t out x r)`` (ranks may differ between tasks).
    inner: the merge applied to the core matrices (:data:`CORE_INNER_METHODS`);
    density: TIES's kept fraction; scale: TIES / task arithmetic / Iso-C factor.
    ``B @ A`` is the best rank-``rank`` approximation of ``U_B M̄ V_A``; dtypes of the first pair.
    """
    if len(pairs) == 0:
        raise MergeError("nothing to merge: the list of LoRA pairs is empty")
    for a, b in pairs:
        product_delta(a, b)  # MergeError when the factors do not chain
        if a.shape[1] != pairs[0][0].shape[1] or b.shape[0] != pairs[0][1].shape[0]:
            raise MergeError("LoRA pairs differ in their input or output size")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeError(f"rank must be an int >= 1, got {rank!r}")
    u_b, v_a = core_bases(pairs)
    cores = [u_b.T @ b.to(torch.float64) @ (a.to(torch.float64) @ v_a.T) for a, b in pairs]
    merged = _inner_merge(cores, inner, density, scale)  # k_B x k_A
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    a_out = torch.zeros(rank, v_a.shape[1], dtype=torch.float64)
    b_out = torch.zeros(u_b.shape[0], rank, dtype=torch.float64)
    a_out[:keep] = root[:, None] * (vh[:keep] @ v_a)
    b_out[:, :keep] = (u_b @ u[:, :keep]) * root[None, :]
    return a_out.to(pairs[0][0].dtype), b_out.to(pairs[0][1].dtype)
