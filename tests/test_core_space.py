"""Core Space merging (NeurIPS 2025) against brute force and hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from regcl.errors import ConfigError, MergeError
from regcl.merging import (
    ContinualMergeState,
    core_space_merge,
    merge_adapters,
    refactor_low_rank,
    ties_merge,
)
from regcl.merging.core_space import core_bases

A_KEY = "base_model.model.image_encoder.blocks.0.attn.qkv.lora_A.weight"
B_KEY = "base_model.model.image_encoder.blocks.0.attn.qkv.lora_B.weight"


def pairs(count: int, *, rank: int = 2, in_dim: int = 7, out_dim: int = 9, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rank, in_dim, generator=gen, dtype=torch.float64),
             torch.randn(out_dim, rank, generator=gen, dtype=torch.float64))
            for _ in range(count)]


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b @ a


def test_projection_to_core_space_is_lossless():
    lora = pairs(3)
    u_b, v_a = core_bases(lora)
    assert u_b.shape == (9, 6) and v_a.shape == (6, 7)
    torch.testing.assert_close(u_b.T @ u_b, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(v_a @ v_a.T, torch.eye(6, dtype=torch.float64))
    for a, b in lora:
        core = u_b.T @ b @ a @ v_a.T
        torch.testing.assert_close(u_b @ core @ v_a, b @ a, atol=1e-12, rtol=1e-12)


def test_linear_inner_merges_equal_the_full_space_ones():
    lora = pairs(3)
    products = [product(a, b) for a, b in lora]
    total = sum(products)
    # Rank 6 = T·r keeps everything: task arithmetic in core space is Σ B_t A_t exactly.
    a, b = core_space_merge(lora, rank=6, inner="task_arithmetic", scale=0.5)
    torch.testing.assert_close(b @ a, 0.5 * total, atol=1e-10, rtol=1e-10)
    # Rank 2: the best rank-2 approximation of the mean of the products (brute-force SVD).
    a, b = core_space_merge(lora, rank=2, inner="mean")
    ref_a, ref_b = refactor_low_rank(total / 3, 2)
    torch.testing.assert_close(b @ a, ref_b @ ref_a, atol=1e-10, rtol=1e-10)
    assert a.shape == (2, 7) and b.shape == (9, 2)


def test_ties_in_core_space_brute_force():
    """TIES on the explicit core matrices, mapped back and truncated by a full SVD."""
    lora = pairs(2, seed=3)
    a_stack = torch.cat([a for a, _ in lora])
    b_stack = torch.cat([b for _, b in lora], dim=1)
    v_a = torch.linalg.svd(a_stack, full_matrices=False).Vh
    u_b = torch.linalg.svd(b_stack, full_matrices=False).U
    cores = [u_b.T @ b @ a @ v_a.T for a, b in lora]
    full = u_b @ ties_merge(cores, density=0.5) @ v_a
    ref_a, ref_b = refactor_low_rank(full, 3)
    a, b = core_space_merge(lora, rank=3, inner="ties", density=0.5)
    torch.testing.assert_close(b @ a, ref_b @ ref_a, atol=1e-10, rtol=1e-10)


def test_hand_computed_rank_one_pairs():
    """Two rank-1 pairs on orthogonal axes: A1 = [2, 0], B1 = [1, 0]ᵀ; A2 = [0, 1], B2 = [0, 3]ᵀ.
    Products diag(2, 0) and diag(0, 3); core bases are the axes (up to sign), so the core
    matrices are those diagonals. Mean -> diag(1, 1.5); its best rank-1 part is 1.5 e2 e2ᵀ.
    TIES at density 0.25 keeps one entry of each 2 x 2 core: both survive, disjoint -> diag(2, 3).
    Iso-C (scale 1): the sum diag(2, 3) with both singular values set to 2.5."""
    lora = [(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0], [0.0]])),
            (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [3.0]]))]
    a, b = core_space_merge(lora, rank=2, inner="mean")
    torch.testing.assert_close(b @ a, torch.diag(torch.tensor([1.0, 1.5])))
    a, b = core_space_merge(lora, rank=1, inner="mean")
    torch.testing.assert_close(b @ a, torch.diag(torch.tensor([0.0, 1.5])))
    a, b = core_space_merge(lora, rank=2, inner="ties", density=0.25)
    torch.testing.assert_close(b @ a, torch.diag(torch.tensor([2.0, 3.0])))
    a, b = core_space_merge(lora, rank=2, inner="iso")
    torch.testing.assert_close(b @ a, torch.diag(torch.tensor([2.5, 2.5])))
    assert a.dtype == torch.float32 and b.dtype == torch.float32


def test_one_adapter_merges_back_to_itself_and_zero_adapters_stay_zero():
    (a1, b1), = pairs(1, seed=5)
    a, b = core_space_merge([(a1, b1)], rank=2, inner="mean")
    torch.testing.assert_close(b @ a, b1 @ a1, atol=1e-10, rtol=1e-10)
    zero = (torch.zeros(2, 4), torch.zeros(3, 2))
    a, b = core_space_merge([zero, zero], rank=2, inner="ties")
    assert not (b @ a).any()


def test_registered_method_merges_pairs_and_averages_other_keys():
    lora = pairs(3, seed=7)
    adapters = [{A_KEY: a.float(), B_KEY: b.float(), "extra.weight": torch.full((2,), float(i))}
                for i, (a, b) in enumerate(lora)]
    merged = merge_adapters("core_space", adapters, inner="mean")
    ref_a, ref_b = refactor_low_rank(sum(product(a, b) for a, b in lora) / 3, 2)
    torch.testing.assert_close((merged[B_KEY] @ merged[A_KEY]).double(), ref_b @ ref_a,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged["extra.weight"], torch.full((2,), 1.0))
    assert list(merged) == list(adapters[0])


def test_bad_parameters_and_no_streaming_form():
    with pytest.raises(ConfigError, match="inner"):
        merge_adapters("core_space", [{A_KEY: torch.ones(1, 2), B_KEY: torch.ones(2, 1)}],
                       inner="nope")
    with pytest.raises(ConfigError, match="density"):
        merge_adapters("core_space", [{A_KEY: torch.ones(1, 2), B_KEY: torch.ones(2, 1)}],
                       density=0.0)
    with pytest.raises(ConfigError, match="all the adapters at once"):
        ContinualMergeState("core_space")
    with pytest.raises(MergeError, match="chain"):
        core_space_merge([(torch.ones(2, 3), torch.ones(4, 3))], rank=1)
