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
    # stored: float32 Gram and mean; cached: float64 precision, P·mu, mu'P·mu and log det
    assert got["router_bytes_per_domain"] == (d * d + d) * 4 + (d * d + d + 2) * 8
    assert "| tiny | 192 |" in run(("tiny",))
