"""``decoder.onnx``: the served model's prompt encoder + mask decoder for browsers, made once.

Adapters only touch the image encoder (:func:`service.engine.slots.check_adapter_files` refuses any
other), so one decoder serves every adapter version, and with a version's embedding a client
decodes exactly what that version would. The file is exported
(:func:`regcl.models.onnx_decoder.export_decoder_onnx`) on first request, kept in memory and
on disk under the service's cache directory, named by the base model's fingerprint, the
opset and the export's revision (a restart reuses it, another base model gets its own).
Before every answer the invariant is checked again on the live model: a LoRA layer outside
the image encoder means 409 ``decoder-not-shared`` rather than a decoder that would disagree
with the server.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from regcl.models.onnx_decoder import EXPORT_REVISION, OPSET, export_decoder_onnx
from service.engine.errors import DecoderNotSharedError
from service.engine.segmentation import SegmentationEngine
from service.engine.slots import adapted_outside_encoder

__all__ = ["DecoderFile", "DecoderOnnx"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderFile:
    """The exported model: its bytes and its ETag (quoted: base fingerprint and opset)."""

    data: bytes
    etag: str


class DecoderOnnx:
    """The decoder file of one engine's base model (thread-safe; one export at a time)."""

    def __init__(self, engine: SegmentationEngine, cache_dir: Path, opset: int = OPSET) -> None:
        self._engine = engine
        self._cache_dir = cache_dir
        self._opset = opset
        self._lock = threading.Lock()
        self._file: DecoderFile | None = None

    def get(self) -> DecoderFile:
        """The file (exported or read from disk the first time). Raises
        DecoderNotSharedError if an adapter reaches beyond the image encoder."""
        adapted = adapted_outside_encoder(self._engine.adapters.sam)
        if adapted:
            raise DecoderNotSharedError(f"an adapter changes the decoder (e.g. {adapted[:2]}), "
                                        "so no single decoder.onnx serves every version")
        with self._lock:
            if self._file is None:
                self._file = self._load_or_export()
            return self._file

    def _load_or_export(self) -> DecoderFile:
        fingerprint = self._engine.adapters.base_fingerprint
        name = f"decoder-{fingerprint[:24]}-opset{self._opset}-r{EXPORT_REVISION}"
        path = self._cache_dir / f"{name}.onnx"
        if path.is_file():
            data = path.read_bytes()
        else:
            data = export_decoder_onnx(self._engine.adapters.sam, self._opset)
            self._cache_dir.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            partial.write_bytes(data)
            partial.replace(path)  # never a half-written file under the final name
            logger.info("exported %s (%d bytes)", path.name, len(data))
        return DecoderFile(data, f'"{name}"')
