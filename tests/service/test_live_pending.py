"""A process that could not load the live version the pointer names (the artifact store away
when it started) and serves none refuses ``live`` (503 ``live-unavailable``) rather than answer
with the base model in live's name, and lets ``live`` be the base model again once the pointer
names no version (issue #24, case 1). In process, tiny SAM; the pointer is a plain function
here (the live follower passes the registry's Redis read)."""

from __future__ import annotations

import numpy as np
import pytest

from regcl.models import build_sam
from service.engine.errors import LiveUnavailableError
from service.engine.segmentation import SegmentationEngine

POINT = {"point_coords": [[40.0, 30.0]], "point_labels": [1]}


def test_live_is_refused_while_pending_and_released_when_the_pointer_goes() -> None:
    engine = SegmentationEngine(build_sam("tiny"), cache_bytes=2**24)
    try:
        image_id = engine.images.register(np.full((64, 80, 3), 90, dtype=np.uint8))
        pointer = {"live": 4}
        engine.adapters.pointer = lambda: pointer["live"]
        engine.adapters.live_pending = 4
        with pytest.raises(LiveUnavailableError, match="live version 4 is not loaded"):
            engine.segment_many(image_id, [POINT], adapter="live")
        base = engine.segment_many(image_id, [POINT], adapter="base")[0]
        assert base.adapter_version == "base"
        pointer["live"] = None  # the pointer was removed (Redis emptied, say)
        live = engine.segment_many(image_id, [POINT], adapter="live")[0]
        assert live.adapter_version == "base" and engine.adapters.live_pending is None
        np.testing.assert_array_equal(live.masks, base.masks)
    finally:
        engine.close()
