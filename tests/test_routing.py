"""The data-free domain router: scores against brute force and hand-computed cases, state
equal to one built from scratch (any fold order), persistence, and the features it reads."""

from __future__ import annotations

import math

import pytest
import torch
from segment_anything.modeling.image_encoder import Block

from regcl.adapters import AdapterConfig, attach_lora, collect_gram_stats
from regcl.errors import RoutingError
from regcl.models.build import SAM_SPECS, build_sam_from_spec
from regcl.models.decoding import preprocess
from regcl.models.encoder import encode_prefix
from regcl.routing import (
    DomainRouter,
    first_layer_key,
    first_layer_moments,
    token_moments,
)
from regcl.training.adapter import first_adapted_block

KEY = "base_model.model.image_encoder.blocks.3.attn.qkv.lora_A.weight"


def domain_stats(tokens: torch.Tensor, *, with_mean: bool = True) -> dict[str, torch.Tensor]:
    """Statistics as collect_gram_stats writes them, from tokens n x D."""
    x = tokens.double()
    stats = {f"{KEY}.gram": (x.T @ x / x.shape[0]).float(),
             f"{KEY}.count": torch.tensor(x.shape[0], dtype=torch.int64)}
    if with_mean:
        stats[f"{KEY}.mean"] = x.mean(0).float()
    return stats


def gaussian_tokens(seed: int, n: int, dim: int, shift: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen) / dim**0.5 + torch.eye(dim)
    offset = shift * torch.randn(dim, generator=gen)
    return torch.randn(n, dim, generator=gen) @ mix + offset


@pytest.fixture(scope="module")
def three():
    return {name: domain_stats(gaussian_tokens(seed, 4000, 6, shift))
            for name, seed, shift in (("b", 1, 2.0), ("a", 2, -1.0), ("c", 3, 0.5))}


def test_score_is_the_mean_gaussian_log_likelihood_per_dimension(three):
    """Brute force: mean over tokens of log N(x; μ, G − μμᵀ), divided by D (ridge 0)."""
    router = DomainRouter.from_stats(three, ridge=0.0)
    tokens = gaussian_tokens(9, 50, 6, 1.0)
    scores, novelty = router.scores(tokens.unsqueeze(0))
    for column, name in enumerate(router.domains):
        mean = three[name][f"{KEY}.mean"].double()
        cov = three[name][f"{KEY}.gram"].double() - torch.outer(mean, mean)
        dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
        expected = dist.log_prob(tokens.double()).mean() / 6
        assert float(scores[0, column]) == pytest.approx(float(expected), rel=1e-9, abs=1e-9)
        diff = tokens.double() - mean
        maha = (diff @ torch.linalg.inv(cov) * diff).sum(1).mean() / 6
        assert float(novelty[0, column]) == pytest.approx(float(maha), rel=1e-9)


def test_one_dimension_by_hand():
    """D = 1: domain a ~ N(0, 1), b ~ N(3, 1); one token at 2.5 -> b, margin 0.5·(6.25 − 0.25)."""
    router = DomainRouter(ridge=0.0)
    for name, mu in (("a", 0.0), ("b", 3.0)):
        router.fold_moments(name, torch.tensor([[1.0 + mu * mu]]), 100, torch.tensor([mu]))
    route = router.route(torch.tensor([[2.5]]), min_margin=0.0)
    assert route.domain == "b" and route.best == "b"
    assert route.margin == pytest.approx(0.5 * (2.5**2 - 0.5**2))
    assert route.scores["b"] == pytest.approx(-0.5 * (0.25 + math.log(2 * math.pi)))
    assert route.novelty == pytest.approx(0.25)
    assert router.route(torch.tensor([[1.5]]), min_margin=0.01).domain is None  # a tie
    assert router.route(torch.tensor([[30.0]]), max_novelty=4.0).domain is None  # from nowhere
    assert router.route(torch.tensor([[30.0]]), max_novelty=1e6).domain == "b"


def test_routes_samples_to_their_domain(three):
    router = DomainRouter.from_stats(three)
    for seed, (name, shift) in enumerate((("b", 2.0), ("a", -1.0), ("c", 0.5))):
        # Same generator seeds as the fixture, fresh draws: 8 images of 64 tokens each.
        tokens = gaussian_tokens({"b": 1, "a": 2, "c": 3}[name], 4000 + 512, 6, shift)[4000:]
        routes = router.route_batch(tokens.reshape(8, 64, 6))
        assert [r.domain for r in routes] == [name] * 8, seed
        assert all(r.novelty < 2 for r in routes)


def test_state_equals_one_built_from_scratch_in_any_fold_order(three, tmp_path):
    scratch = DomainRouter.from_stats(three)
    for order in (("a", "b", "c"), ("c", "a", "b"), ("b", "c", "a")):
        router = DomainRouter()
        for name in order:
            router.fold(name, three[name])
        tensors, meta = router.to_tensors()
        expected, expected_meta = scratch.to_tensors()
        assert meta == expected_meta and set(tensors) == set(expected)
        for key, value in tensors.items():
            assert torch.equal(value, expected[key])
    path = tmp_path / "router.safetensors"
    scratch.save(path)
    loaded = DomainRouter.load(path)
    tokens = gaussian_tokens(5, 128, 6, 0.0).reshape(2, 64, 6)
    assert torch.equal(loaded.scores(tokens)[0], scratch.scores(tokens)[0])
    assert loaded.domains == ("a", "b", "c") and loaded.key == KEY


def test_each_domain_scores_alone_subsets_and_removal(three):
    full = DomainRouter.from_stats(three)
    pair = DomainRouter.from_stats({k: three[k] for k in ("a", "c")})
    tokens = gaussian_tokens(6, 256, 6, 0.3).reshape(4, 64, 6)
    scores = full.scores(tokens)[0]
    assert torch.equal(pair.scores(tokens)[0], scores[:, [0, 2]])
    full.remove("b")
    assert torch.equal(full.scores(tokens)[0], pair.scores(tokens)[0])
    assert full.to_tensors()[0]["grams"].equal(pair.to_tensors()[0]["grams"])


def test_statistics_without_a_mean_use_zero_mean():
    tokens = gaussian_tokens(7, 2000, 4, 1.0)
    old = DomainRouter.from_stats({"x": domain_stats(tokens, with_mean=False)}, ridge=0.0)
    zero_mean = DomainRouter(ridge=0.0)
    stats = domain_stats(tokens)
    zero_mean.fold_moments("x", stats[f"{KEY}.gram"], 2000, torch.zeros(4))
    probe = tokens[:64].unsqueeze(0)
    assert torch.equal(old.scores(probe)[0], zero_mean.scores(probe)[0])
    assert old.route(tokens[:64]).margin == math.inf


def test_bad_input_is_refused_and_leaves_the_router_unchanged(three, tmp_path):
    router = DomainRouter.from_stats({"a": three["a"]})
    before = router.to_tensors()
    with pytest.raises(RoutingError, match="already"):
        router.fold("a", three["b"])
    with pytest.raises(RoutingError, match="6 x 6"):
        router.fold_moments("z", torch.eye(5), 10)
    with pytest.raises(RoutingError, match="lack"):
        router.fold("z", {f"{KEY}.gram": torch.eye(6)})
    with pytest.raises(RoutingError, match="finite"):
        router.fold_moments("z", torch.full((6, 6), math.nan), 10)
    with pytest.raises(RoutingError, match="mean"):
        router.fold_moments("z", torch.eye(6), 10, torch.zeros(5))
    assert router.to_tensors()[0]["grams"].equal(before[0]["grams"])
    with pytest.raises(RoutingError):
        router.route(torch.zeros(3, 5))  # wrong feature size
    with pytest.raises(RoutingError, match="no domains"):
        DomainRouter().route(torch.zeros(3, 6))
    with pytest.raises(RoutingError, match="ridge"):
        DomainRouter(ridge=-1.0)
    with pytest.raises(RoutingError, match="not positive definite"):
        DomainRouter.from_stats({"flat": domain_stats(torch.ones(50, 6))}, ridge=0.0).route(
            torch.zeros(2, 6))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(RoutingError):
        DomainRouter.load(bad)
    with pytest.raises(RoutingError, match="unknown domain"):
        router.remove("nope")


def test_first_layer_key_picks_the_lowest_block_and_qkv():
    keys = ["x.blocks.5.attn.qkv.lora_A.weight.gram", "x.blocks.3.attn.proj.lora_A.weight.gram",
            "x.blocks.3.attn.qkv.lora_A.weight.count", "x.blocks.3.attn.qkv.lora_B.weight.gram"]
    assert first_layer_key(keys) == "x.blocks.3.attn.qkv.lora_A.weight"
    assert first_layer_key(["y.blocks.10.mlp.lin1.lora_A.weight"]) == (
        "y.blocks.10.mlp.lin1.lora_A.weight")
    with pytest.raises(RoutingError):
        first_layer_key(["no.lora.here"])


def test_window_padding_is_counted_as_the_statistics_count_it():
    """A windowed block pads 10 x 10 tokens to 12 x 12 with zeros before qkv sees them."""
    torch.manual_seed(0)
    block = Block(dim=8, num_heads=2, window_size=6, input_size=(6, 6)).eval()
    seen = []
    block.attn.qkv.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    tokens = torch.randn(2, 10, 10, 8)
    with torch.no_grad():
        block(tokens)
    x = torch.cat(seen).double()  # windows of both images, padding included
    x = x.reshape(2, -1, 8)
    second, first, counts = first_layer_moments(block, tokens)
    assert counts.tolist() == [144, 144]
    expected_second = x.transpose(1, 2) @ x / 144
    assert torch.allclose(second, expected_second, atol=1e-10)
    assert torch.allclose(first, x.sum(1) / 144, atol=1e-10)
    second_plain, _, _ = token_moments(tokens)
    assert second_plain.shape == (2, 8, 8)


def test_tiny_sam_statistics_and_router_features_agree():
    """For the tiny SAM the router's image moments, pooled, are the adapter's own statistics."""
    torch.manual_seed(0)
    model = attach_lora(build_sam_from_spec(SAM_SPECS["tiny"]), AdapterConfig(rank=4), seed=0)
    images = torch.rand(3, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 255
    stats = collect_gram_stats(model, images=images)
    sam = model.base_model.model
    first = first_adapted_block(model)
    with torch.no_grad():
        prefix = encode_prefix(sam.image_encoder, preprocess(sam, images), first)
    second, mean, counts = first_layer_moments(sam.image_encoder.blocks[first], prefix)
    key = first_layer_key(stats)
    assert key == KEY
    torch.testing.assert_close(second.mean(0).float(), stats[f"{key}.gram"], atol=1e-4,
                               rtol=1e-4)
    torch.testing.assert_close(mean.mean(0).float(), stats[f"{key}.mean"], atol=1e-5, rtol=1e-5)
    assert int(counts.sum()) == int(stats[f"{key}.count"])
    router = DomainRouter.from_stats({"only": stats})
    assert router.route_moments(second, mean)[0].best == "only"
