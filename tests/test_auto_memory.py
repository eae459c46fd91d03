"""``regcl bench auto-memory`` against sizes computed by hand for the tiny SAM (D = 192; the
default adapter: rank 10 on attn.qkv (192 → 576) of blocks 3-5)."""

from __future__ import annotations

from cli.auto_memory import measure, run


def test_the_tiny_sams_figures_are_the_hand_computed_ones() -> None:
    d, r, blocks = 192, 10, 3
    got = measure("tiny")
    assert got["dim"] == d
    assert got["adapter_bytes"] == blocks * (r * d + 3 * d * r) * 4
    assert got["stats_file_bytes"] == blocks * ((d * d + d) * 4 + 8 + (r * r + r) * 4 + 8)
    # the served router: float32 K x K precision (K = 128), whitened mean (D) and variances
    # outside the subspace (D - K), float64 log det and image count; shared: mean and whitening
    k = 128
    assert got["router_bytes_per_domain"] == (k * k + d + d - k) * 4 + 2 * 8
    assert got["router_shared_bytes"] == (d + d * d) * 8
    # the full Gaussian router before it: float32 Gram and mean stored; float64 precision,
    # P·mu, mu'P·mu and log det cached
    assert got["full_router_bytes_per_domain"] == (d * d + d) * 4 + (d * d + d + 2) * 8
    assert "| tiny | 192 |" in run(("tiny",))


def test_at_vit_b_the_router_holds_less_per_domain_than_the_adapter() -> None:
    got = measure("vit_b")
    assert got["dim"] == 768 and got["adapter_bytes"] == 614_400
    assert got["router_bytes_per_domain"] <= got["adapter_bytes"]
    assert got["router_bytes_per_domain"] == (128 * 128 + 768 + 640) * 4 + 16
