"""Merge maths as pure functions over tensors (no model code, no file I/O).

Shapes follow the torch ``Linear`` convention: a weight is ``out x in``; the Gram matrix of a
layer's inputs is ``in x in``. For a LoRA module, ``lora_A`` is ``r x in`` and ``lora_B`` is
``out x r``; the product ``B @ A`` is the ``out x in`` weight delta.

RegMean (Jin et al., 2023) merges linear weights ``W_t`` with input Grams ``G_t`` as
``W* = ((Σ_t G_t)^-1 Σ_t G_t W_tᵀ)ᵀ``: the weight whose outputs are closest, in least squares,
to each task's own weight on that task's inputs. All solves run in float64 and never form an
explicit inverse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from regcl.errors import MergeError
from regcl.merging.catalogue import GRAM_WEIGHTINGS

__all__ = [
    "GRAM_WEIGHTINGS",
    "gram_scale",
    "magmax_merge",
    "mean_merge",
    "product_delta",
    "product_regmean_merge",
    "refactor_low_rank",
    "regmean_merge",
    "regmean_solve",
    "regmean_terms",
    "shrink_gram",
    "task_arithmetic_merge",
    "ties_merge",
]

# Used instead of ``ridge * mean(diag(ΣG))`` when every Gram is zero (a layer that never saw a
# non-zero input): keeps the system solvable and, with the ridge pulling to the plain mean,
# returns that mean.
_TINY_RIDGE = 1e-12


def _check_number(value: float, name: str, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and low <= value <= high):
        raise MergeError(f"{name} must be a finite number in [{low}, {high}], got {value}")
    return float(value)


def _check_finite(tensor: Tensor, what: str) -> None:
    if not tensor.is_floating_point():
        raise MergeError(f"{what} must be a floating-point tensor, got dtype {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise MergeError(f"{what} contains NaN or infinite values")


def _check_weights(weights: Sequence[Tensor], *, matrix: bool = False) -> torch.Size:
    """Checks that ``weights`` is a non-empty list of finite tensors of one shape; returns it."""
    if len(weights) == 0:
        raise MergeError("nothing to merge: the list of weights is empty")
    shape = weights[0].shape
    for index, weight in enumerate(weights):
        if weight.shape != shape:
            raise MergeError(
                f"weights differ in shape: weight 0 is {tuple(shape)}, "
                f"weight {index} is {tuple(weight.shape)}"
            )
        _check_finite(weight, f"weight {index}")
    if matrix and len(shape) != 2:
        raise MergeError(f"RegMean needs 2-D (out x in) weights, got shape {tuple(shape)}")
    return shape


def _check_gram(gram: Tensor, in_dim: int, what: str) -> None:
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise MergeError(f"{what} must be a square in x in matrix, got shape {tuple(gram.shape)}")
    if gram.shape[0] != in_dim:
        raise MergeError(
            f"{what} is {gram.shape[0]} x {gram.shape[1]} but the weight's input dim is {in_dim}"
        )
    _check_finite(gram, what)


def shrink_gram(gram: Tensor, alpha: float) -> Tensor:
    """RegMean's off-diagonal shrink: ``alpha * G + (1 - alpha) * diag(G)``.

    gram:  in x in.  alpha: in [0, 1]; 1 leaves ``gram`` as it is, 0 keeps only its diagonal
    (the merge then weighs each input feature by its own energy, per column).
    Returns in x in, same dtype.
    """
    alpha = _check_number(alpha, "alpha", low=0.0, high=1.0)
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise MergeError(f"a Gram must be square in x in, got shape {tuple(gram.shape)}")
    if alpha == 1.0:
        return gram
    return alpha * gram + (1.0 - alpha) * torch.diag_embed(torch.diagonal(gram))


def regmean_terms(
    weight: Tensor, gram: Tensor, *, alpha: float = 1.0, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """One task's contribution to the RegMean sums, in float64.

    weight: out x in.  gram: in x in.  scale: > 0, this task's weight in the sums
    (:func:`gram_scale`).
    Returns ``(G̃, G̃ Wᵀ)``: in x in and in x out, where ``G̃ = scale · shrink_gram(gram, alpha)``.
    The from-scratch merge and the continual state both add exactly these terms, so they agree.
    """
    scale = _check_number(scale, "scale", low=0.0)
    if scale == 0.0:
        raise MergeError("a Gram's scale must be > 0")
    gram64 = shrink_gram(gram.to(torch.float64), alpha)
    if scale != 1.0:
        gram64 = scale * gram64
    return gram64, gram64 @ weight.to(torch.float64).T


def gram_scale(gram: Tensor, count: float, weighting: str) -> float:
    """The factor one domain's Gram (in x in, ``XᵀX/n``) gets under ``weighting``.

    count: that Gram's token count n. See :data:`~regcl.merging.catalogue.GRAM_WEIGHTINGS`.
    """
    if weighting == "domain":
        return 1.0
    if weighting == "tokens":
        if not float(count) > 0:
            raise MergeError(f"token weighting needs a token count > 0, got {count}")
        return _check_number(float(count), "token count", low=0.0)
    if weighting == "trace":
        energy = float(torch.diagonal(gram.to(torch.float64)).mean())
        return 1.0 / energy if energy > 0 else 1.0
    raise MergeError(f"unknown Gram weighting {weighting!r}; known: {', '.join(GRAM_WEIGHTINGS)}")


def regmean_solve(
    gram_sum: Tensor,
    gram_weight_sum: Tensor,
    *,
    ridge: float = 1e-4,
    weight_mean: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Solves ``(ΣG + λI) Wᵀ = ΣG Wᵀ_t (+ λ W̄ᵀ)`` for the merged weight.

    gram_sum:        in x in, ``Σ_t G̃_t`` (symmetric positive semi-definite).
    gram_weight_sum: in x out, ``Σ_t G̃_t W_tᵀ``.
    ridge:           relative ridge ≥ 0; ``λ = ridge * mean(diag(ΣG))``.
    weight_mean:     out x in, optional ``W̄ = mean_t W_t``. When given, the ridge pulls the
                     solution towards ``W̄`` instead of towards zero, so directions no domain
                     excited get the plain average and equal weights merge back to themselves.
    out_dtype:       dtype of the result (default: ``gram_weight_sum.dtype``).
    Returns the merged weight, out x in. Raises MergeError when the system is singular
    (possible only with ``ridge == 0``) or inputs are malformed.
    """
    ridge = _check_number(ridge, "ridge", low=0.0)
    if gram_sum.dim() != 2 or gram_sum.shape[0] != gram_sum.shape[1]:
        raise MergeError(f"gram_sum must be square in x in, got shape {tuple(gram_sum.shape)}")
    in_dim = gram_sum.shape[0]
    if gram_weight_sum.dim() != 2 or gram_weight_sum.shape[0] != in_dim:
        raise MergeError(
            f"gram_weight_sum must be in x out with in={in_dim}, "
            f"got shape {tuple(gram_weight_sum.shape)}"
        )
    _check_finite(gram_sum, "gram_sum")
    _check_finite(gram_weight_sum, "gram_weight_sum")
    out_dim = gram_weight_sum.shape[1]
    if weight_mean is not None:
        if tuple(weight_mean.shape) != (out_dim, in_dim):
            raise MergeError(
                f"weight_mean must be out x in = {(out_dim, in_dim)}, "
                f"got {tuple(weight_mean.shape)}"
            )
        _check_finite(weight_mean, "weight_mean")

    lhs = gram_sum.to(torch.float64)
    lhs = (lhs + lhs.T) / 2  # Grams accumulated in floating point drift from exact symmetry
    rhs = gram_weight_sum.to(torch.float64)
    if ridge > 0:
        scale = float(torch.diagonal(lhs).mean())
        lam = ridge * scale if scale > 0 else _TINY_RIDGE
        lhs = lhs + lam * torch.eye(in_dim, dtype=torch.float64, device=lhs.device)
        if weight_mean is not None:
            rhs = rhs + lam * weight_mean.to(torch.float64).T
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) != 0:
        raise MergeError(
            "the Gram sum is not positive definite (some input direction was never seen); "
            f"use ridge > 0 (got ridge={ridge})"
        )
    solution = torch.cholesky_solve(rhs, chol)  # in x out
    return solution.T.contiguous().to(out_dtype or gram_weight_sum.dtype)


def regmean_merge(
    weights: Sequence[Tensor],
    grams: Sequence[Tensor],
    *,
    ridge: float = 1e-4,
    alpha: float = 1.0,
    scales: Sequence[float] | None = None,
) -> Tensor:
    """RegMean merge of one linear weight across tasks.

    weights: T tensors, each out x in.  grams: T tensors, each in x in (task t's input Gram).
    ridge:   relative ridge ≥ 0 pulling towards the plain mean (see :func:`regmean_solve`).
    alpha:   off-diagonal shrink in [0, 1] applied to every Gram (see :func:`shrink_gram`).
    scales:  T factors > 0 on the Grams (:func:`gram_scale`); default all 1.
    Returns out x in, in the dtype of ``weights[0]``.
    """
    shape = _check_weights(weights, matrix=True)
    if len(grams) != len(weights):
        raise MergeError(f"got {len(weights)} weights but {len(grams)} Grams")
    scales = [1.0] * len(weights) if scales is None else list(scales)
    if len(scales) != len(weights):
        raise MergeError(f"got {len(weights)} weights but {len(scales)} Gram scales")
    for index, gram in enumerate(grams):
        _check_gram(gram, shape[1], f"Gram {index}")
    gram_sum = torch.zeros(shape[1], shape[1], dtype=torch.float64, device=weights[0].device)
    gram_weight_sum = torch.zeros(shape[1], shape[0], dtype=torch.float64, device=gram_sum.device)
    for weight, gram, scale in zip(weights, grams, scales):
        gram_t, gram_weight_t = regmean_terms(weight, gram, alpha=alpha, scale=scale)
        gram_sum += gram_t
        gram_weight_sum += gram_weight_t
    weight_mean = _sum64(weights) / len(weights)
    return regmean_solve(
        gram_sum, gram_weight_sum, ridge=ridge, weight_mean=weight_mean, out_dtype=weights[0].dtype
    )


def _sum64(weights: Sequence[Tensor]) -> Tensor:
    total = torch.zeros(weights[0].shape, dtype=torch.float64, device=weights[0].device)
    for weight in weights:
        total += weight.to(torch.float64)
    return total


def mean_merge(weights: Sequence[Tensor]) -> Tensor:
    """Element-wise mean of T tensors of one shape, in weights[0]'s dtype."""
    _check_weights(weights)
    return (_sum64(weights) / len(weights)).to(weights[0].dtype)


def task_arithmetic_merge(weights: Sequence[Tensor], *, scale: float = 1.0) -> Tensor:
    """Task arithmetic on a zero base: ``scale * Σ_t W_t`` (LoRA weights are already deltas).

    weights: T tensors of one shape; returns that shape and weights[0]'s dtype.
    """
    scale = _check_number(scale, "scale", low=-math.inf)
    _check_weights(weights)
    return (scale * _sum64(weights)).to(weights[0].dtype)


def magmax_merge(weights: Sequence[Tensor]) -> Tensor:
    """MagMax: per element, the value with the largest magnitude across tasks (first on ties).

    weights: T tensors of one shape; returns that shape and weights[0]'s dtype.
    """
    _check_weights(weights)
    # A running selection (not argmax over a stack) so the continual state, which can only
    # compare the running winner with the next task, picks exactly the same elements.
    result = weights[0].clone()
    for weight in weights[1:]:
        weight = weight.to(result.dtype)
        result = torch.where(weight.abs() > result.abs(), weight, result)
    return result


def ties_merge(weights: Sequence[Tensor], *, density: float = 0.2, scale: float = 1.0) -> Tensor:
    """TIES-Merging (Yadav et al., 2023) on a zero base.

    1. Trim: keep each task's ``round(density * numel)`` (at least 1) largest-magnitude entries.
    2. Elect: per element, the sign of the sum of the trimmed values (where that sum is exactly
       zero, the sign of the whole tensor's summed signs, as the reference code does).
    3. Disjoint mean: average only the non-zero trimmed values that agree with the elected sign.
    The result is multiplied by ``scale``.
    weights: T tensors of one shape; returns that shape and weights[0]'s dtype.
    """
    density = _check_number(density, "density", low=0.0, high=1.0)
    if density == 0.0:
        raise MergeError("density must be > 0 (0 would trim every value)")
    scale = _check_number(scale, "scale", low=-math.inf)
    _check_weights(weights)
    stacked = torch.stack([w.to(torch.float64).reshape(-1) for w in weights])  # T x N
    numel = stacked.shape[1]
    keep = max(1, round(density * numel))
    trimmed = torch.zeros_like(stacked)
    if numel > 0:
        top = stacked.abs().topk(keep, dim=1).indices
        trimmed.scatter_(1, top, stacked.gather(1, top))
    elected = torch.sign(trimmed.sum(dim=0))
    majority = torch.sign(elected.sum())
    elected = torch.where(elected == 0, majority, elected)
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agree.sum(dim=0).clamp(min=1)
    merged = (trimmed * agree).sum(dim=0) / count
    return (scale * merged).reshape(weights[0].shape).to(weights[0].dtype)


def refactor_low_rank(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Factors ``delta`` (out x in) into LoRA factors by truncated SVD.

    Returns ``(A, B)`` with A: rank x in = ``sqrt(S_r) V_rᵀ`` and B: out x rank = ``U_r sqrt(S_r)``,
    so ``B @ A`` is the best rank-``rank`` approximation of ``delta`` (exact when its rank is
    ≤ ``rank``). Splitting ``sqrt(S)`` evenly keeps A and B on the same scale.
    """
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise MergeError(f"rank must be an int, got {type(rank).__name__}")
    if delta.dim() != 2:
        raise MergeError(f"delta must be 2-D (out x in), got shape {tuple(delta.shape)}")
    if not 1 <= rank <= min(delta.shape):
        raise MergeError(f"rank must be in [1, {min(delta.shape)}] for {tuple(delta.shape)}")
    _check_finite(delta, "delta")
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root[None, :]
    return a.to(delta.dtype), b.to(delta.dtype)


def product_delta(a: Tensor, b: Tensor) -> Tensor:
    """``B @ A`` in float64. a: r x in, b: out x r; returns out x in."""
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise MergeError(
            f"LoRA factors do not chain: A is {tuple(a.shape)} (r x in), "
            f"B is {tuple(b.shape)} (out x r)"
        )
    return b.to(torch.float64) @ a.to(torch.float64)


def product_regmean_merge(
    pairs: Sequence[tuple[Tensor, Tensor]],
    grams_in: Sequence[Tensor],
    *,
    rank: int,
    ridge: float = 1e-4,
    alpha: float = 1.0,
    scales: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """RegMean on the LoRA product ``ΔW_t = B_t @ A_t``, then re-factored to rank ``rank``.

    pairs:    T pairs ``(A_t, B_t)``, A: r x in, B: out x r.
    grams_in: T Grams of the module input x, each in x in (the lora_A Grams).
    scales:   T factors > 0 on the Grams (:func:`gram_scale`); default all 1.
    Merging the product avoids the cross terms ``B_i A_j`` that merging A and B separately
    produces. Returns ``(A, B)``: rank x in and out x rank, in the dtype of the first A.
    """
    if len(pairs) == 0:
        raise MergeError("nothing to merge: the list of LoRA pairs is empty")
    _check_weights([a for a, _ in pairs], matrix=True)
    _check_weights([b for _, b in pairs], matrix=True)
    deltas = [product_delta(a, b) for a, b in pairs]
    merged = regmean_merge(deltas, grams_in, ridge=ridge, alpha=alpha, scales=scales)
    a, b = refactor_low_rank(merged, rank)
    return a.to(pairs[0][0].dtype), b.to(pairs[0][1].dtype)
