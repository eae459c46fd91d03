"""Shared fixtures: small models and data that keep the suite to minutes on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from regcl.data import synthetic
from regcl.models.build import SAM_SPECS, build_sam_from_spec


def pytest_configure(config):
    # One thread: the suite is many small ops, and with 2 cores a second torch thread spins
    # and slows them several-fold whenever anything else runs on the machine.
    torch.set_num_threads(1)


@pytest.fixture
def random_tiny():
    """A tiny SAM with seeded random weights (fast to build; nothing learnt)."""
    torch.manual_seed(0)
    return build_sam_from_spec(SAM_SPECS["tiny"])


@pytest.fixture(scope="session")
def source_batch():
    """8 held-out source scenes: images 8 x 3 x 256 x 256 in [0, 255], masks 8 x 256 x 256."""
    return synthetic.chunked(synthetic.source_scenes, 99, 0, 8, 256)
