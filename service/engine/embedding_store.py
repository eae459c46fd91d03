"""Persisted image embeddings: what the Label Studio pre-encode job writes and every API process
reads, so the first click on a pre-encoded image costs the decoder only.

Where: the artifact store (:class:`infra.artifacts.ArtifactStore`, a local directory or
``s3://``), which every API process of a deployment shares, under
``embeddings/<base>/<adapter>/<image id>.npz``:

- ``<base>``: the first 16 hex digits of the base model's fingerprint
  (:attr:`~service.engine.adapter_table.AdapterTable.base_fingerprint`), so another checkpoint
  never reads these;
- ``<adapter>``: the adapter version that made it, stable across processes: ``base``,
  ``live-<n>`` (the registry's live version ``n``), ``domain-<name>-<revision>`` (a domain
  adapter loaded from the registry, by the content hash of its files). A domain adapter
  loaded by hand has no revision and is never persisted (:func:`version_id` is None);
- ``<image id>``: the engine's image id, a SHA-256 of the pixels.

Each file is an uncompressed ``.npz`` of ``features`` (1 x C x h x w, in the store's dtype),
``original_size`` (H, W), ``input_size`` (H', W') and ``dtype`` (the engine's own, cast back
on load). float16 halves the bytes (vit_b: 2 MiB instead of 4 per image); its effect on masks
is measured by ``scripts/first_click_bench.py --fp16-check`` and stated in docs/benchmarks.md.

A blob is written once (create-only; a second writer of the same key loses harmlessly) and
never changes, so readers need no lock. A read that fails (a damaged file, the store away)
counts as a miss and is logged: the request encodes instead.
"""

from __future__ import annotations

import io
import logging
import threading
import time

import numpy as np
import torch

from infra.artifacts import ArtifactStore
from infra.errors import Conflict, NotFound, StoreUnavailable
from service.engine.adapter_table import BASE
from service.engine.caches import EncodedImage
from service.engine.slots import AdapterSlot

__all__ = ["DTYPES", "EmbeddingStore", "version_id"]

logger = logging.getLogger(__name__)

PREFIX = "embeddings"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32}
AWAY_S = 10.0
"""After the store did not answer, requests encode without asking it for this long (a first
click must not wait for a dead endpoint's timeouts on every request)."""


def version_id(slot: AdapterSlot | None) -> str | None:
    """The adapter part of a store key (see the module doc), or None: not persistable."""
    if slot is None:
        return BASE
    if slot.kind == "live" and slot.version is not None:
        return f"live-{slot.version}"
    if slot.kind == "domain" and slot.revision:
        return f"domain-{slot.name}-{slot.revision[:16]}"
    return None


class EmbeddingStore:
    """Embeddings under ``embeddings/<base>/<adapter>/<image id>.npz`` of ``artifacts``.

    Args:
        artifacts: the shared artifact store.
        base_fingerprint: the base model's fingerprint (hex).
        dtype: what features are stored as (``torch.float16`` or ``torch.float32``).
    """

    def __init__(self, artifacts: ArtifactStore, base_fingerprint: str,
                 dtype: torch.dtype = torch.float16) -> None:
        if dtype not in _NUMPY:
            raise ValueError(f"embeddings are stored as float16 or float32, not {dtype}")
        self.artifacts = artifacts
        self.base = base_fingerprint[:16]
        self.dtype = dtype
        self.loads = 0  # embeddings read back (request-path hits)
        self.writes = 0
        self._lock = threading.Lock()
        self._away_until = 0.0  # monotonic time until which the store is not asked

    def key(self, image_id: str, version: str) -> str:
        return f"{PREFIX}/{self.base}/{version}/{image_id}.npz"

    def size(self, image_id: str, version: str) -> int | None:
        """Bytes of a stored embedding, or None when there is none."""
        try:
            return self.artifacts.size(self.key(image_id, version))
        except NotFound:
            return None

    def get(self, image_id: str, slot: AdapterSlot | None, adapter_key: str,
            device: torch.device | str) -> EncodedImage | None:
        """The stored embedding of ``image_id`` under ``slot`` (features on ``device`` in the
        dtype the engine made them in; ``adapter_key``: the caller's cache key for it), or
        None."""
        version = version_id(slot)
        if version is None or time.monotonic() < self._away_until:
            return None
        try:
            data = self.artifacts.get_bytes(self.key(image_id, version))
        except NotFound:
            return None
        except StoreUnavailable as exc:  # the store away: encode, and stop asking it a while
            self._away_until = time.monotonic() + AWAY_S
            logger.warning("embedding store unreachable (%s); requests encode for the next "
                           "%.0f s without asking it", exc, AWAY_S)
            return None
        except Exception as exc:  # anything else: this request encodes instead
            logger.warning("embedding store: %s unreadable (%s)", image_id, exc)
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                features = torch.from_numpy(npz["features"].copy())
                dtype = getattr(torch, str(npz["dtype"]))
                original = tuple(int(v) for v in npz["original_size"])
                inputs = tuple(int(v) for v in npz["input_size"])
        except Exception as exc:
            logger.warning("embedding store: %s/%s is damaged (%s)", version, image_id, exc)
            return None
        with self._lock:
            self.loads += 1
        return EncodedImage(image_id, features.to(device=device, dtype=dtype), original,
                            inputs, BASE if slot is None else slot.label, adapter_key)

    def put(self, encoded: EncodedImage, slot: AdapterSlot | None) -> int:
        """Store ``encoded`` (made with ``slot``) unless it is there; returns the bytes it
        takes in the store (0: not persistable)."""
        version = version_id(slot)
        if version is None:
            return 0
        key = self.key(encoded.image_id, version)
        features = encoded.features.detach().to("cpu", self.dtype).numpy()
        buffer = io.BytesIO()
        np.savez(buffer, features=features, dtype=np.array(str(encoded.features.dtype)
                                                           .removeprefix("torch.")),
                 original_size=np.array(encoded.original_size, dtype=np.int64),
                 input_size=np.array(encoded.input_size, dtype=np.int64))
        data = buffer.getvalue()
        try:
            self.artifacts.put_bytes(key, data)
        except Conflict:  # another job or process wrote it first: same bytes
            return self.size(encoded.image_id, version) or len(data)
        with self._lock:
            self.writes += 1
        return len(data)
