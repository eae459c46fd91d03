"""Where ``adapter: "auto"`` sends the tests' images: the serving engine's router over the
tests' statistics-only tiny-SAM adapters (tests/service/auto_support.py: 6 training images
per domain), for the test images 0-3 of five domains and four images of no domain (uniform
noise, and uniform grey, black and white squares). Prints, per image, the domain taken ('-'
when it falls back to live), the best domain, the margin and the novelty, under routers over
three, four and two domains (the sets the tests use).

Usage: PYTHONPATH=. python scripts/auto_route_survey.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from regcl.adapters import read_adapter
from regcl.models import build_sam
from service.engine.auto_routing import domain_entry
from service.engine.segmentation import SegmentationEngine
from tests.service.auto_support import SIZE, domain_image, nowhere, stats_adapter

DOMAINS = ("polyp", "shadow", "camo_pattern", "skin", "camo")
ROUTERS = (("polyp", "shadow", "camo_pattern"), ("polyp", "shadow", "camo_pattern", "skin"),
           ("polyp", "camo_pattern"))
ELSEWHERE = {"noise": nowhere(), "grey": np.full((SIZE, SIZE, 3), 128, np.uint8),
             "black": np.zeros((SIZE, SIZE, 3), np.uint8),
             "white": np.full((SIZE, SIZE, 3), 255, np.uint8)}


def main() -> None:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    files = {d: read_adapter(stats_adapter(root / d, d)) for d in DOMAINS}
    engine = SegmentationEngine(build_sam("tiny"), cache_bytes=2**26)
    for name, adapter in files.items():
        engine.adapters.load_domain(name, adapter)

    def where(image: np.ndarray) -> str:
        route = engine.route(engine.images.register(image))[0].route
        return (f"{route.domain or '-'} (best {route.best}, margin {route.margin:.2f}, "
                f"novelty {route.novelty:.2f})")

    for names in ROUTERS:
        engine.routing.replace([domain_entry(d, d, files[d].stats) for d in names])
        print(f"router over {', '.join(names)}")
        for domain in DOMAINS:
            for index in range(4):
                print(f"  {domain} test {index}: {where(domain_image(domain, index))}")
        for name, image in ELSEWHERE.items():
            print(f"  {name}: {where(image)}")
    engine.close()


if __name__ == "__main__":
    main()
