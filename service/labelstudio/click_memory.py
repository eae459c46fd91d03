"""The previous mask of an interactive session, fed back with the next click.

Label Studio posts the whole interaction on every click: ``context.result`` holds all the
smart keypoints placed so far on the task (and the rectangle, if any). SAM was trained to take
its previous prediction back as a prompt (the low-res logits as ``mask_input``: SAM's paper
§A training loop, SamPredictor's interactive use, the ONNX decoder's ``mask_input``), and the
click protocol (:mod:`regcl.evaluation.clicks`) scores it that way. So each answer's low-res
logits are remembered under the prompt that made them, and a request whose prompt is a
remembered one **plus one more keypoint** decodes with those logits fed back.

What is remembered is keyed by project, the adapter asked for, the image and the prompt (its
keypoints, labels and box, to 1e-4 percent), in one byte-bounded LRU per API process: a click
that reaches another API process, or comes after its entry was evicted, is decoded from the
points alone (as before), never refused.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from service.engine.caches import ByteLRU
from service.labelstudio.context import ContextPrompt

__all__ = ["ClickMemory"]

_DIGITS = 4  # percent, rounded: the browser sends floats; 1e-4 % is far below a pixel


def _key(project: int | None, adapter: str, image_id: str,
         points: tuple[tuple[float, float], ...], labels: tuple[int, ...],
         box: tuple[float, ...] | None) -> Hashable:
    rounded = tuple((round(x, _DIGITS), round(y, _DIGITS)) for x, y in points)
    return (project, adapter, image_id, rounded, labels,
            None if box is None else tuple(round(v, _DIGITS) for v in box))


class ClickMemory:
    """Low-res logits of recent interactive answers (see the module doc). ``max_bytes`` 0:
    nothing is remembered (every click decodes from its points alone)."""

    def __init__(self, max_bytes: int) -> None:
        self._lru: ByteLRU[Hashable, np.ndarray] = ByteLRU(max_bytes)

    def previous(self, project: int | None, adapter: str, image_id: str,
                 prompt: ContextPrompt) -> np.ndarray | None:
        """1 x h x w logits of the same session one keypoint ago, or None."""
        if len(prompt.points) < 2:
            return None
        return self._lru.get(_key(project, adapter, image_id, prompt.points[:-1],
                                  prompt.labels[:-1], prompt.box))

    def remember(self, project: int | None, adapter: str, image_id: str, prompt: ContextPrompt,
                 logits: np.ndarray) -> None:
        """Keep ``logits`` (1 x h x w, the single-mask answer) for the session's next click."""
        if prompt.points:
            self._lru.put(_key(project, adapter, image_id, prompt.points, prompt.labels,
                               prompt.box), np.ascontiguousarray(logits[:1], dtype=np.float32))

    @property
    def stats(self) -> tuple[int, int]:
        """(hits, misses) of :meth:`previous` lookups so far."""
        return self._lru.hits, self._lru.misses
