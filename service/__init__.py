"""The regcl service: segmentation serving (engine, caches, masks) under the HTTP layer."""

from service.adapter_table import AUTO, BASE, LIVE
from service.cache import ByteLRU, CacheStats, EmbeddingCache, EncodedImage
from service.decoding import SegmentResult
from service.engine import SegmentationEngine
from service.engine_stats import EngineStats, SwapResult
from service.image_store import image_id_of
from service.masks import mask_area, mask_bbox, mask_to_png, mask_to_rle, rle_to_mask
from service.slots import AdapterSlot

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
    "mask_area",
    "mask_bbox",
    "mask_to_png",
    "mask_to_rle",
    "rle_to_mask",
]
