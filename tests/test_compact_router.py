"""The served domain router (:class:`regcl.routing.compact.CompactRouter`): with the whole space
kept (K = D, no prior) it is the full Gaussian router; its novelty against a brute-force
divergence; a smaller subspace keeps the state per domain small and still routes; the prior's
effect; a build from functions reads each domain three times and equals the eager one;
persistence; refusals; and its bytes against the adapter's at vit_b's width."""

from __future__ import annotations

import math

import pytest
import torch

from regcl.errors import RoutingError
from regcl.routing import CompactRouter, DomainMoments, DomainRouter, token_moments
from service.engine.auto_routing import router_digest
from tests.test_routing import KEY, domain_stats, gaussian_tokens

DIM = 6


@pytest.fixture(scope="module")
def three():
    return {name: domain_stats(gaussian_tokens(seed, 4000, DIM, shift))
            for name, seed, shift in (("b", 1, 2.0), ("a", 2, -1.0), ("c", 3, 0.5))}


def _images(count: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = torch.stack([gaussian_tokens(20 + i, 60, DIM, 1.0) for i in range(count)])
    return token_moments(tokens)


def test_with_the_whole_space_and_no_prior_it_is_the_full_router(three):
    full = DomainRouter.from_stats(three)
    compact = CompactRouter.from_stats(three, rank=DIM, prior_images=0.0)
    second, first, _ = _images()
    want, _ = full.score_moments(second, first)
    got, _ = compact.score_moments(second, first)
    assert compact.domains == full.domains == ("a", "b", "c")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # float32 precisions stored


def test_novelty_is_the_divergence_with_the_volume_counted_w_times(three):
    """Brute force: ½ [q/D − 1 + w (log det Σ_t − log det Σ_img) / D], q the mean squared
    Mahalanobis distance of the image's tokens under domain t (w = 1: KL per feature)."""
    second, first, _ = _images(3)
    for weight in (1.0, 2.0):
        router = CompactRouter.from_stats(three, rank=DIM, prior_images=0.0, ridge=0.0,
                                          volume_weight=weight)
        _, novelty = router.score_moments(second, first)
        for column, name in enumerate(router.domains):
            mean = three[name][f"{KEY}.mean"].double()
            cov = three[name][f"{KEY}.gram"].double() - torch.outer(mean, mean)
            precision = torch.linalg.inv(cov)
            for row in range(len(second)):
                own = second[row] - torch.outer(first[row], first[row])
                centred = own + torch.outer(first[row] - mean, first[row] - mean)
                q = float((precision * centred).sum())
                gap = float(torch.logdet(cov) - torch.logdet(own))
                want = 0.5 * (q / DIM - 1 + weight * gap / DIM)
                assert math.isclose(float(novelty[row, column]), want, rel_tol=1e-4,
                                    abs_tol=1e-4)


def test_a_small_subspace_keeps_little_per_domain_and_still_routes():
    """Twelve 32-wide domains, each off the pool in a few directions of its own; K = 8."""
    dim, names = 32, [f"d{i:02d}" for i in range(12)]
    stats, tests = {}, {}
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(i)
        own = torch.randn(dim, 2, generator=gen)
        mean = torch.randn(dim, generator=gen) * 0.5

        def draw(n: int, gen=gen, own=own, mean=mean) -> torch.Tensor:
            return (torch.randn(n, dim, generator=gen) + torch.randn(n, 2, generator=gen)
                    @ own.T * 2 + mean)

        x = draw(3000).double()
        stats[name] = DomainMoments(x.T @ x / len(x), len(x), x.mean(0))
        tests[name] = token_moments(torch.stack([draw(200) for _ in range(4)]))
    router = CompactRouter.build(stats, rank=8, prior_images=0.0)
    assert router.domain_nbytes() == (8 * 8 + dim + (dim - 8)) * 4 + 2 * 8
    right = sum(int((router.score_moments(*tests[n][:2])[0].argmax(1) == i).sum())
                for i, n in enumerate(names))
    assert right == 4 * len(names)


def test_the_prior_pulls_a_domain_seen_on_few_images_towards_the_pool(three):
    """The same 4000 tokens as 2 images (2000 tokens each) or as 4000 images: a prior of 2
    images moves domain a's score of its own held-out tokens far more in the first case."""
    moments = {name: DomainMoments(s[f"{KEY}.gram"], int(s[f"{KEY}.count"]),
                                   s[f"{KEY}.mean"]) for name, s in three.items()}
    held_out = gaussian_tokens(2, 4600, DIM, -1.0)[4000:].reshape(10, 60, DIM)  # a's own
    second, first, _ = token_moments(held_out)
    moved = {}
    for tokens, images in ((2000, 2.0), (1, 4000.0)):
        scores = []
        for prior in (0.0, 2.0):
            router = CompactRouter.build(moments, rank=DIM, prior_images=prior,
                                         tokens_per_image=tokens)
            assert router.images("a") == images
            scores.append(router.score_moments(second, first)[0][:, 0])  # column a
        moved[images] = float((scores[1] - scores[0]).abs().max())
    assert moved[2.0] > 3 * moved[4000.0] > 0  # 0.82 against 0.17 nats


def test_a_build_from_functions_reads_each_domain_three_times_and_equals_the_eager_one(three):
    eager = CompactRouter.from_stats(three, rank=3)
    calls: dict[str, int] = {}

    def reader(name: str):
        def read() -> DomainMoments:
            calls[name] = calls.get(name, 0) + 1
            s = three[name]
            return DomainMoments(s[f"{KEY}.gram"], int(s[f"{KEY}.count"]), s[f"{KEY}.mean"])
        return read

    lazy = CompactRouter.build({n: reader(n) for n in three}, key=KEY, rank=3)
    assert calls == dict.fromkeys(three, 3)
    assert router_digest(lazy) == router_digest(eager)


def test_persistence_round_trip(three, tmp_path):
    router = CompactRouter.from_stats(three, rank=4, prior_images=2.0, tokens_per_image=10)
    router.save(tmp_path / "r.safetensors")
    again = CompactRouter.load(tmp_path / "r.safetensors")
    assert router_digest(again) == router_digest(router) and again.key == KEY
    second, first, _ = _images()
    assert torch.equal(again.score_moments(second, first)[0],
                       router.score_moments(second, first)[0])
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(RoutingError):
        CompactRouter.load(tmp_path / "bad.safetensors")


def test_refusals(three):
    with pytest.raises(RoutingError, match="at least one"):
        CompactRouter.build({})
    good = DomainMoments(torch.eye(DIM), 10, torch.zeros(DIM))
    for bad, match in ((DomainMoments(torch.eye(5), 10), "6 x 6"),
                       (DomainMoments(torch.full((DIM, DIM), float("nan")), 10), "finite"),
                       (DomainMoments(torch.eye(DIM), 0), "count"),
                       (DomainMoments(torch.eye(DIM), 10, torch.zeros(3)), "mean")):
        with pytest.raises(RoutingError, match=match):
            CompactRouter.build({"a": good, "b": bad})
    for option, value in (("rank", 0), ("prior_images", -1.0), ("tokens_per_image", 0),
                          ("volume_weight", float("inf"))):
        with pytest.raises(RoutingError, match=option):
            CompactRouter.build({"a": good}, **{option: value})
    router = CompactRouter.build({"a": good})
    with pytest.raises(RoutingError, match="moments"):
        router.score_moments(torch.zeros(1, 5, 5), torch.zeros(1, 5))
