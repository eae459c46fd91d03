"""Tests of regcl.merging: merge maths, named methods and the continual state (CPU, tiny)."""

from __future__ import annotations

import itertools

import pytest
import torch

from regcl.adapters.layout import count_key, gram_key
from regcl.errors import ConfigError, MergeError, StatsError
from regcl.merging import (
    ContinualMergeState,
    available_methods,
    gram_scale,
    magmax_merge,
    mean_merge,
    merge_adapters,
    product_regmean_merge,
    refactor_low_rank,
    regmean_merge,
    shrink_gram,
    task_arithmetic_merge,
    ties_merge,
)

PREFIX = "base_model.model.image_encoder.blocks.{}.attn.qkv"
A_KEY = PREFIX.format(0) + ".lora_A.weight"
B_KEY = PREFIX.format(0) + ".lora_B.weight"
EXTRA_KEY = "base_model.model.mask_decoder.iou_token.weight"  # a parameter without statistics
STREAMING = ["regcl", "regcl_product", "mean", "task_arithmetic", "magmax"]


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def random_domain(
    seed: int, *, rank: int = 2, in_dim: int = 5, out_dim: int = 4, blocks: int = 2
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A random LoRA adapter over ``blocks`` qkv modules plus one extra key, and its stats."""
    gen = torch.Generator().manual_seed(seed)
    adapter: dict[str, torch.Tensor] = {}
    stats: dict[str, torch.Tensor] = {}
    for block in range(blocks):
        a_key = PREFIX.format(block) + ".lora_A.weight"
        b_key = PREFIX.format(block) + ".lora_B.weight"
        adapter[a_key] = torch.randn(rank, in_dim, generator=gen)
        adapter[b_key] = torch.randn(out_dim, rank, generator=gen)
        x = torch.randn(12, in_dim, generator=gen)
        ax = x @ adapter[a_key].T
        for key, inputs in ((a_key, x), (b_key, ax)):
            stats[gram_key(key)] = inputs.T @ inputs / inputs.shape[0]
            stats[count_key(key)] = torch.tensor(float(inputs.shape[0]))
    adapter[EXTRA_KEY] = torch.randn(1, 3, generator=gen)
    return adapter, stats


def assert_adapters_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert list(got) == list(want)
    for key, expected in want.items():
        assert got[key].dtype == expected.dtype, key
        torch.testing.assert_close(got[key], expected, atol=atol, rtol=1e-5, msg=key)


# -- merge_utils: hand-computed cases ---------------------------------------------------------


def test_elementwise_methods_hand_computed() -> None:
    w1, w2 = t([[1, 2], [3, 4]]), t([[3, 0], [-1, 2]])
    torch.testing.assert_close(mean_merge([w1, w2]), t([[2, 1], [1, 3]]))
    torch.testing.assert_close(task_arithmetic_merge([w1, w2], scale=2.0), t([[8, 4], [4, 12]]))
    m1, m2 = t([[1, -5], [3, 0]]), t([[-2, 4], [1, 0.5]])
    torch.testing.assert_close(magmax_merge([m1, m2]), t([[-2, -5], [3, 0.5]]))
    torch.testing.assert_close(magmax_merge([t([2]), t([-2])]), t([2]))  # ties: the first


def test_ties_hand_computed() -> None:
    # density 0.5 keeps 2 of 4 entries per task:
    #   T1 -> [[4, 0], [0, -3]], T2 -> [[2, 2], [0, 0]], T3 -> [[0, -3], [0, 5]]
    # summed signs [[+, -], [0, +]]; disjoint means: (4+2)/2, -3, 0 (nothing kept), 5.
    tasks = [t([[4, -1], [0.5, -3]]), t([[2, 2], [1, -0.5]]), t([[1, -3], [0.2, 5]])]
    torch.testing.assert_close(ties_merge(tasks, density=0.5), t([[3, -3], [0, 5]]))
    torch.testing.assert_close(ties_merge(tasks, density=0.5, scale=2.0), t([[6, -6], [0, 10]]))
    # A summed sign of exactly 0 takes the tensor's majority sign (+ here): [3, 2], not [0, 2].
    torch.testing.assert_close(ties_merge([t([3, -1]), t([-3, 2])], density=1.0), t([3, 2]))


def test_regmean_hand_computed() -> None:
    # ΣG = 4·I; ΣG Wᵀ = [2, 1] + [-1, 2] = [1, 3]  ->  W* = [0.25, 0.75]
    g1, g2 = t([[2, 1], [1, 2]]), t([[2, -1], [-1, 2]])
    merged = regmean_merge([t([[1, 0]]), t([[0, 1]])], [g1, g2], ridge=0.0)
    torch.testing.assert_close(merged, t([[0.25, 0.75]]))
    # Diagonal Grams weigh each input column: [(3·1 + 1·5)/4, (1·2 + 1·6)/2] = [2, 4]
    merged = regmean_merge(
        [t([[1, 2]]), t([[5, 6]])], [torch.diag(t([3, 1])), torch.diag(t([1, 1]))], ridge=0.0
    )
    torch.testing.assert_close(merged, t([[2, 4]]))


def test_regmean_equal_grams_is_the_plain_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=gen)
    gram = x.T @ x / 20
    weights = [torch.randn(3, 4, generator=gen) for _ in range(3)]
    for ridge in (0.0, 1e-4, 1.0):  # the ridge pulls to the mean, so any ridge keeps it exact
        torch.testing.assert_close(
            regmean_merge(weights, [gram] * 3, ridge=ridge),
            mean_merge(weights),
            atol=1e-5,
            rtol=1e-5,
        )


def test_regmean_recovers_the_least_squares_solution() -> None:
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (20, 30)]
    ws = [torch.randn(2, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    ys = [x @ w.T for x, w in zip(xs, ws)]
    lstsq = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution.T  # 2 x 3
    merged = regmean_merge(ws, [x.T @ x for x in xs], ridge=0.0)
    torch.testing.assert_close(merged, lstsq, atol=1e-10, rtol=1e-10)


def test_alpha_zero_is_the_diagonal_weighted_mean() -> None:
    g1, g2 = t([[4, 1], [1, 1]]), t([[1, -1], [-1, 3]])
    w1, w2 = t([[1, 2], [3, 4]]), t([[5, 6], [7, 8]])
    torch.testing.assert_close(shrink_gram(g1, 0.0), t([[4, 0], [0, 1]]))
    torch.testing.assert_close(shrink_gram(g1, 0.5), t([[4, 0.5], [0.5, 1]]))
    # column 0 weights 4 : 1, column 1 weights 1 : 3
    want = t([[(4 * 1 + 5) / 5, (2 + 3 * 6) / 4], [(4 * 3 + 7) / 5, (4 + 3 * 8) / 4]])
    torch.testing.assert_close(regmean_merge([w1, w2], [g1, g2], ridge=0.0, alpha=0.0), want)


def test_refactor_low_rank_reproduces_a_rank_r_matrix() -> None:
    gen = torch.Generator().manual_seed(2)
    delta = torch.randn(6, 2, generator=gen) @ torch.randn(2, 5, generator=gen)
    a, b = refactor_low_rank(delta, 2)
    assert a.shape == (2, 5) and b.shape == (6, 2) and a.dtype == delta.dtype
    torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=1e-5)
    with pytest.raises(MergeError, match="rank"):
        refactor_low_rank(delta, 6)


def test_product_regmean_hand_computed_and_equal_adapters() -> None:
    # ΔW1 = [[1, 0], [0, 0]], ΔW2 = [[0, 0], [1, 0]]; diagonal Grams (3, 1) and (1, 1) give
    # column 0 = (3·[1, 0] + [0, 1]) / 4, column 1 = 0: a rank-1 ΔW*, reproduced exactly.
    pairs = [(t([[1, 0]]), t([[1], [0]])), (t([[1, 0]]), t([[0], [1]]))]
    a, b = product_regmean_merge(
        pairs, [torch.diag(t([3, 1])), torch.diag(t([1, 1]))], rank=1, ridge=0.0
    )
    torch.testing.assert_close(b @ a, t([[0.75, 0], [0.25, 0]]))
    adapter, stats = random_domain(3)
    merged = merge_adapters("regcl_product", [adapter] * 3, [stats] * 3)
    torch.testing.assert_close(
        merged[B_KEY] @ merged[A_KEY], adapter[B_KEY] @ adapter[A_KEY], atol=1e-5, rtol=1e-5
    )


# -- methods ----------------------------------------------------------------------------------


def test_regcl_method_hand_computed() -> None:
    g1, g2 = t([[2, 1], [1, 2]]), t([[2, -1], [-1, 2]])
    adapters = [
        {A_KEY: t([[1, 0]]), B_KEY: t([[4], [0]]), EXTRA_KEY: t([[1, 1]])},
        {A_KEY: t([[0, 1]]), B_KEY: t([[0], [4]]), EXTRA_KEY: t([[3, 5]])},
    ]
    stats = [
        {
            gram_key(A_KEY): g1,
            count_key(A_KEY): t(10),
            gram_key(B_KEY): t([[1]]),
            count_key(B_KEY): t(10),
        },
        {
            gram_key(A_KEY): g2,
            count_key(A_KEY): t(7),
            gram_key(B_KEY): t([[3]]),
            count_key(B_KEY): t(7),
        },
    ]
    merged = merge_adapters("regcl", adapters, stats, ridge=0.0)
    assert list(merged) == [A_KEY, B_KEY, EXTRA_KEY]
    torch.testing.assert_close(merged[A_KEY], t([[0.25, 0.75]]))
    torch.testing.assert_close(merged[B_KEY], t([[1], [3]]))  # (1·B1 + 3·B2) / 4
    torch.testing.assert_close(merged[EXTRA_KEY], t([[2, 3]]))  # no stats: mean


def test_registry_lists_methods_and_rejects_unknown_names_and_params() -> None:
    assert set(available_methods()) == {*STREAMING, "ties", "core_space"}
    with pytest.raises(ConfigError, match="known methods: core_space, magmax, mean, regcl"):
        merge_adapters("fisher", [{"w": t([1])}])
    with pytest.raises(ConfigError, match="alpha"):
        merge_adapters("regcl", [{"w": t([1])}], [{}], alpha=1.5)
    with pytest.raises(ConfigError, match="density"):
        merge_adapters("ties", [{"w": t([1])}], density=0.0)
    with pytest.raises(ConfigError, match="unknown parameter"):
        merge_adapters("mean", [{"w": t([1])}], scale=2.0)


def test_bad_adapters_raise_merge_error() -> None:
    adapter, stats = random_domain(4)
    other = dict(adapter, **{A_KEY: torch.zeros(3, 5)})
    with pytest.raises(MergeError, match="adapter 1"):
        merge_adapters("mean", [adapter, other])
    nan = dict(adapter, **{A_KEY: torch.full((2, 5), float("nan"))})
    with pytest.raises(MergeError, match="NaN"):
        merge_adapters("regcl", [adapter, nan], [stats, stats])
    with pytest.raises(MergeError, match="shape"):
        mean_merge([torch.zeros(2, 2), torch.zeros(2, 3)])
    with pytest.raises(MergeError, match="input dim"):
        regmean_merge([torch.zeros(2, 3)], [torch.eye(2)])
    with pytest.raises(MergeError, match="NaN"):
        regmean_merge([torch.zeros(2, 2)], [torch.full((2, 2), float("nan"))])


def test_missing_stats_raise_stats_error() -> None:
    adapter, stats = random_domain(5)
    with pytest.raises(StatsError, match="needs Gram statistics"):
        merge_adapters("regcl", [adapter, adapter])
    partial = {k: v for k, v in stats.items() if not k.startswith(B_KEY)}
    with pytest.raises(StatsError, match=r"adapter 1: .*lora_B"):
        merge_adapters("regcl", [adapter, adapter], [stats, partial])
    bad_shape = dict(stats, **{gram_key(A_KEY): torch.eye(4)})
    with pytest.raises(StatsError, match="adapter 0"):
        merge_adapters("regcl_product", [adapter], [bad_shape])


# -- continual state --------------------------------------------------------------------------


@pytest.mark.parametrize("method", STREAMING)
def test_state_equals_merging_from_scratch(method: str) -> None:
    params = {"task_arithmetic": {"scale": 0.5}, "regcl": {"alpha": 0.7}}.get(method, {})
    domains = [random_domain(seed) for seed in range(5)]
    state = ContinualMergeState(method, **params)
    for count, (adapter, stats) in enumerate(domains, start=1):
        state.fold(adapter, stats, domain=f"d{count}")
        if count in (1, 2, 5):
            scratch = merge_adapters(
                method, [a for a, _ in domains[:count]], [s for _, s in domains[:count]], **params
            )
            assert_adapters_close(state.merged(), scratch)
    assert state.num_domains == 5 and state.domains == ("d1", "d2", "d3", "d4", "d5")


def test_state_memory_does_not_grow() -> None:
    state = ContinualMergeState("regcl")
    sizes = {}
    for count in range(1, 11):
        state.fold(*random_domain(count), domain=f"d{count}")
        sizes[count] = state.nbytes()
    assert sizes[2] == sizes[10] > 0


@pytest.mark.parametrize("method", ["regcl_product", "magmax"])
def test_state_save_load_round_trip(method: str, tmp_path) -> None:
    state = ContinualMergeState(method, **({"ridge": 1e-3} if method == "regcl_product" else {}))
    for seed in range(2):
        state.fold(*random_domain(seed), domain=f"d{seed}")
    state.save(tmp_path / "state.safetensors")
    loaded = ContinualMergeState.load(tmp_path / "state.safetensors")
    assert (loaded.method, loaded.params, loaded.domains) == (method, state.params, state.domains)
    assert_adapters_close(loaded.merged(), state.merged(), atol=0)
    for target in (state, loaded):  # both continue identically
        target.fold(*random_domain(9), domain="d9")
    assert_adapters_close(loaded.merged(), state.merged(), atol=0)


def test_state_rejects_ties_unknown_methods_and_empty_merges() -> None:
    with pytest.raises(ConfigError, match="running sums"):
        ContinualMergeState("ties")
    with pytest.raises(ConfigError, match="known methods"):
        ContinualMergeState("nope")
    with pytest.raises(MergeError, match="empty"):
        ContinualMergeState("regcl").merged()


def test_failed_fold_leaves_the_state_unchanged() -> None:
    state = ContinualMergeState("regcl")
    adapter, stats = random_domain(0)
    state.fold(adapter, stats, domain="polyp")
    before_tensors, before_meta = state.to_tensors()
    # The NaN sits in the last key, so a fold that mutated while validating would be caught.
    bad_nan = dict(adapter, **{EXTRA_KEY: torch.full((1, 3), float("nan"))})
    no_stats = {k: v for k, v in stats.items() if not k.startswith(B_KEY)}
    failures = [
        (MergeError, dict(adapter, **{B_KEY: torch.zeros(4, 3)}), stats, "shadow"),
        (MergeError, bad_nan, stats, "shadow"),
        (StatsError, adapter, None, "shadow"),
        (StatsError, adapter, no_stats, "shadow"),
        (MergeError, adapter, stats, "polyp"),  # the same domain twice
    ]
    for error, bad_adapter, bad_stats, domain in failures:
        with pytest.raises(error):
            state.fold(bad_adapter, bad_stats, domain=domain)
        after_tensors, after_meta = state.to_tensors()
        assert after_meta == before_meta
        assert all(torch.equal(after_tensors[k], v) for k, v in before_tensors.items())
    assert state.domains == ("polyp",)


# -- Gram weighting and small ridges ----------------------------------------------------------


def test_gram_weighting_hand_computed() -> None:
    # G1 = diag(2, 1) over 10 tokens, G2 = diag(1, 1) over 30; W1 = [[1, 1]], W2 = [[3, 5]].
    g1, g2 = torch.diag(t([2, 1])), torch.diag(t([1, 1]))
    w1, w2 = t([[1, 1]]), t([[3, 5]])
    # domain: column weights 2:1 and 1:1 -> [(2 + 3)/3, (1 + 5)/2]
    torch.testing.assert_close(regmean_merge([w1, w2], [g1, g2], ridge=0.0), t([[5 / 3, 3]]))
    # tokens: ×10 and ×30 -> column 0: (20·1 + 30·3)/50, column 1: (10 + 150)/40
    scales = [gram_scale(g1, 10, "tokens"), gram_scale(g2, 30, "tokens")]
    assert scales == [10.0, 30.0]
    torch.testing.assert_close(regmean_merge([w1, w2], [g1, g2], ridge=0.0, scales=scales),
                               t([[110 / 50, 160 / 40]]))
    # trace: G1 / 1.5, G2 / 1 -> column 0: (4/3 + 3)/(7/3), column 1: (2/3 + 5)/(5/3)
    scales = [gram_scale(g1, 10, "trace"), gram_scale(g2, 30, "trace")]
    torch.testing.assert_close(regmean_merge([w1, w2], [g1, g2], ridge=0.0, scales=scales),
                               t([[(4 / 3 + 3) / (7 / 3), (2 / 3 + 5) / (5 / 3)]]))
    with pytest.raises(MergeError, match="weighting"):
        gram_scale(g1, 10, "nope")
    with pytest.raises(ConfigError, match="weighting"):
        merge_adapters("regcl", *zip(random_domain(0)), weighting="nope")


@pytest.mark.parametrize("method", ["regcl", "regcl_product"])
@pytest.mark.parametrize("weighting", ["tokens", "trace"])
def test_weighted_state_equals_scratch_and_equal_counts_match_domain(method, weighting) -> None:
    domains = [random_domain(seed) for seed in range(3)]
    adapters, stats = [a for a, _ in domains], [s for _, s in domains]
    state = ContinualMergeState(method, weighting=weighting)
    for i, (adapter, stat) in enumerate(domains):
        state.fold(adapter, stat, domain=f"d{i}")
    scratch = merge_adapters(method, adapters, stats, weighting=weighting)
    assert_adapters_close(state.merged(), scratch)
    plain = merge_adapters(method, adapters, stats)
    if weighting == "tokens":  # every domain saw 12 tokens: weighting by count changes nothing
        assert_adapters_close(scratch, plain, atol=1e-4)
    else:
        assert any(not torch.allclose(scratch[k], plain[k]) for k in plain)
    # A domain with 4x the tokens pulls the token-weighted merge towards itself.
    heavy = [{k: (v * 4 if k.endswith(".count") else v) for k, v in s.items()} for s in stats]
    tilted = merge_adapters(method, adapters, [heavy[0], *stats[1:]], weighting="tokens")
    assert any(not torch.allclose(tilted[k], plain[k], atol=1e-4) for k in plain)


def test_small_ridges_approach_the_exact_solve() -> None:
    """Ridges below 1e-4 move the merge towards the ridge-free RegMean solution."""
    domains = [random_domain(seed, in_dim=5) for seed in range(3)]
    adapters, stats = [a for a, _ in domains], [s for _, s in domains]
    exact = merge_adapters("regcl", adapters, stats, ridge=0.0)
    gaps = []
    for ridge in (1e-2, 1e-4, 1e-6, 1e-8, 1e-10):
        merged = merge_adapters("regcl", adapters, stats, ridge=ridge)
        gaps.append(max(float((merged[k] - exact[k]).abs().max()) for k in exact))
    assert all(b <= a for a, b in itertools.pairwise(gaps)) and gaps[-1] < 1e-6 < gaps[0]
