"""The serving engine: one SAM with its LoRA adapters, an image store, an embedding cache,
batched encodes and decodes, ``adapter: "auto"`` routing and hot swaps.

:class:`SegmentationEngine` (:mod:`.segmentation`) runs a request from a prompt to masks. Its
parts are public attributes, used directly rather than through delegating methods:
``engine.images`` (:class:`~.image_store.ImageStore`), ``engine.adapters``
(:class:`~.adapter_table.AdapterTable`: live and domain adapters, swaps), ``engine.cache``
(:class:`~.caches.EmbeddingCache`) and ``engine.routing``
(:class:`~.auto_routing.DomainRouting`). This package imports nothing of ``service.api`` or
``service.labelstudio``.
"""

from service.engine.adapter_table import AUTO, BASE, LIVE
from service.engine.caches import ByteLRU, CacheStats, EmbeddingCache, EncodedImage
from service.engine.decode import SegmentResult
from service.engine.image_store import image_id_of
from service.engine.segmentation import SegmentationEngine
from service.engine.slots import AdapterSlot
from service.engine.stats import EngineStats, SwapResult

__all__ = [
    "AUTO",
    "BASE",
    "LIVE",
    "AdapterSlot",
    "ByteLRU",
    "CacheStats",
    "EmbeddingCache",
    "EncodedImage",
    "EngineStats",
    "SegmentResult",
    "SegmentationEngine",
    "SwapResult",
    "image_id_of",
]
