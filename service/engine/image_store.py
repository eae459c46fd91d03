"""Uploaded images, by content hash, in a byte-bounded LRU store.

The engine keeps each uploaded image here and computes its embedding lazily, per adapter.
An image evicted from the store can still be segmented with adapters whose embedding is
cached; otherwise :class:`~service.engine.errors.ImageNotFoundError` asks the client to upload it
again.
"""

from __future__ import annotations

import hashlib

import numpy as np

from service.engine.caches import ByteLRU, CacheStats
from service.engine.errors import ImageNotFoundError, InvalidImageError

__all__ = ["DEFAULT_IMAGE_STORE_BYTES", "ImageStore", "image_id_of"]

DEFAULT_IMAGE_STORE_BYTES = 512 * 2**20


def image_id_of(image: np.ndarray) -> str:
    """Content hash of an H x W x 3 uint8 image: sha256 of its shape and pixels (hex)."""
    digest = hashlib.sha256(f"{image.shape[0]}x{image.shape[1]}x3:uint8:".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


class ImageStore:
    """H x W x 3 uint8 RGB images (private read-only copies) by :func:`image_id_of`, at most
    ``max_bytes`` of them (least recently used evicted first). Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_IMAGE_STORE_BYTES) -> None:
        self._images: ByteLRU[str, np.ndarray] = ByteLRU(max_bytes)

    def register(self, image: np.ndarray) -> str:
        """Store ``image``; returns its id. The id is a content hash, so registering the same
        pixels twice gives the same id (and reuses cached embeddings). Raises
        InvalidImageError for other arrays, or an image larger than the whole store."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
                or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            shape = getattr(image, "shape", None)
            dtype = getattr(image, "dtype", type(image).__name__)
            raise InvalidImageError(f"expected an H x W x 3 uint8 image, got {dtype} {shape}")
        image_id = image_id_of(image)
        if self._images.get(image_id) is None:
            stored = np.array(image, dtype=np.uint8, order="C", copy=True)
            stored.setflags(write=False)
            if not self._images.put(image_id, stored):
                raise InvalidImageError(f"image of {stored.nbytes} bytes exceeds the image "
                                        f"store ({self._images.max_bytes} bytes)")
        return image_id

    def get(self, image_id: str) -> np.ndarray:
        """The image (now most recently used); ImageNotFoundError if it is not stored."""
        image = self._images.get(image_id) if isinstance(image_id, str) else None
        if image is None:
            raise ImageNotFoundError(f"unknown image id {image_id!r} (never uploaded, or "
                                     "evicted: upload it again)")
        return image

    def peek(self, image_id: str) -> np.ndarray | None:
        """The image (read-only) or None, without changing its recency."""
        return self._images.peek(image_id) if isinstance(image_id, str) else None

    def size_of(self, image_id: str) -> tuple[int, int] | None:
        """(H, W) of a stored image, or None; counts nothing and keeps recency."""
        image = self._images.peek(image_id) if isinstance(image_id, str) else None
        return None if image is None else (int(image.shape[0]), int(image.shape[1]))

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._images

    def pop(self, image_id: str) -> bool:
        """Drop an image; returns whether it was stored."""
        return self._images.pop(image_id) is not None

    def stats(self) -> CacheStats:
        return self._images.stats()
