"""The decoder file of :mod:`service.engine.onnx_export`: exported once, reused from disk, and
refused when an adapter reaches beyond the image encoder (the invariant that lets one
``decoder.onnx`` serve every adapter version)."""

from __future__ import annotations

import onnx
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from regcl.errors import RegclError
from regcl.models import build_sam
from regcl.models.onnx_decoder import DECODER_INPUTS, DECODER_OUTPUTS
from service.engine.errors import DecoderNotSharedError
from service.engine.onnx_export import DecoderOnnx
from service.engine.segmentation import SegmentationEngine
from service.engine.slots import adapted_outside_encoder


@pytest.fixture
def engine():
    torch.manual_seed(0)
    engine = SegmentationEngine(build_sam("tiny").eval(), 2**24)
    yield engine
    engine.close()


def test_exported_once_then_read_from_disk(engine, tmp_path) -> None:
    first = DecoderOnnx(engine, tmp_path).get()
    model = onnx.load_from_string(first.data)
    assert [i.name for i in model.graph.input] == list(DECODER_INPUTS)
    assert [o.name for o in model.graph.output] == list(DECODER_OUTPUTS)
    (path,) = tmp_path.glob("decoder-*.onnx")
    written = path.stat().st_mtime_ns
    again = DecoderOnnx(engine, tmp_path).get()  # as after a restart: read, not exported
    assert again == first
    assert path.stat().st_mtime_ns == written
    assert not list(tmp_path.glob("*.partial"))


def test_refused_when_an_adapter_changes_the_decoder(engine, tmp_path) -> None:
    decoder = DecoderOnnx(engine, tmp_path)
    assert adapted_outside_encoder(engine.adapters.sam) == []
    inject_adapter_in_model(LoraConfig(r=2, target_modules=[
        "mask_decoder.iou_prediction_head.layers.0"]), engine.adapters.sam, adapter_name="bad")
    assert adapted_outside_encoder(engine.adapters.sam) == [
        "mask_decoder.iou_prediction_head.layers.0"]
    with pytest.raises(DecoderNotSharedError) as caught:
        decoder.get()
    assert isinstance(caught.value, RegclError) and isinstance(caught.value, ValueError)
    assert not list(tmp_path.glob("decoder-*"))  # nothing exported
