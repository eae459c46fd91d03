"""The worker's compute stays on the model's device (``REGCL_WORKER_DEVICE=cuda``), proved
without a GPU.

The model is moved to PyTorch's ``meta`` device, which stands in for CUDA: tensors there have
shapes and dtypes but no data. The dataset stays in host memory, as the worker keeps it, so
every batch must be moved. :class:`StrictDevices` (a ``TorchDispatchMode``) watches every
operator the worker's compute runs - training, Gram statistics, held-out scoring, the
evaluation and statistics jobs, exactly the functions the tasks call - and records each one
whose tensors sit on two devices at once, by CUDA's own rules: a 0-dim CPU tensor (a scalar)
and CPU index tensors are allowed, copies between devices are the explicit transfers, and a
CPU random generator may only drive CPU tensors. Any tensor left on the CPU and handed to the
model would be reported. The few reads of a value (``loss.item()``, ``.cpu()`` for prompt
sampling, ``nonzero``, boolean masks) get stand-in values, since meta tensors hold none.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from regcl.adapters import AdapterConfig, attach_lora, unwrap
from regcl.evaluation.evaluate import evaluate_points
from regcl.models.decoding import predict_masks_batched
from workers.params import EvaluateParams, TrainParams
from workers.prepare import DomainTensors
from workers.steps import chunk_gram_stats, evaluate_chunks, fit_adapter

aten = torch.ops.aten
_TRANSFERS = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default,
              aten._copy_from_and_resize.default}
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
             aten._index_put_impl_.default}


class StrictDevices(TorchDispatchMode):
    """Runs every operator as usual; one that mixes devices (see module doc) is recorded in
    :attr:`violations` and stops the run with an AssertionError naming it."""

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []
        self.ops_on_meta = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on_meta = any(t.device.type == "meta" for t in tensors)
        self.ops_on_meta += on_meta
        if on_meta and func not in _TRANSFERS:
            self._check(func, flat, tensors)
        if on_meta:
            stand_in = self._stand_in(func, args, kwargs)
            if stand_in is not NotImplemented:
                return stand_in
        return func(*args, **kwargs)

    def _check(self, func: Any, flat: list[Any], tensors: list[torch.Tensor]) -> None:
        devices = set()
        for i, t in enumerate(tensors):
            if t.device.type == "cpu" and t.dim() == 0:
                continue  # a scalar: CUDA kernels take CPU scalars
            if t.device.type == "cpu" and func in _INDEXING and i > 0 \
                    and t.dtype in (torch.long, torch.int, torch.bool):
                continue  # CPU index tensors: CUDA indexing accepts them
            devices.add(t.device.type)
        generators = {g.device.type for g in flat if isinstance(g, torch.Generator)}
        if len(devices) > 1 or generators - devices:
            self.violations.append(f"{func}: tensors on {sorted(devices)}, generators on "
                                   f"{sorted(generators)}")
            raise AssertionError(f"devices mixed, as CUDA would refuse: {self.violations[-1]}")

    @staticmethod
    def _stand_in(func: Any, args: tuple, kwargs: Mapping[str, Any]) -> Any:
        """Values for the operators that read a meta tensor's (absent) data: items, nonzero,
        copies to the CPU (zeros), boolean-mask indexing (nothing selected)."""
        if func is aten._local_scalar_dense.default:  # .item(), float(), bool()
            return False if args[0].dtype == torch.bool else 0.5
        if func is aten.nonzero.default:
            return torch.empty((0, args[0].dim()), dtype=torch.long, device="meta")
        masks = [i for i in (args[1] if func in _INDEXING else ())
                 if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
        if masks and func is aten.index.Tensor:  # x[mask]: no element selected
            return torch.empty((0, *args[0].shape[masks[0].dim():]), dtype=args[0].dtype,
                               device="meta")
        if masks:  # x[mask] = v: nothing to write
            return args[0] if func is not aten.index_put.default else torch.empty_like(args[0])
        if func is aten._to_copy.default and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "cpu":  # .cpu(): zeros
            dtype = kwargs.get("dtype") or args[0].dtype
            return torch.zeros(args[0].shape, dtype=dtype)
        return NotImplemented


class Reporter:
    """What fit_adapter reports to, recorded (a JobHandle without Redis)."""

    def __init__(self) -> None:
        self.phases: list[str] = []
        self.steps: list[int] = []

    def phase(self, fraction: float, name: str, **detail: Any) -> None:
        self.phases.append(name)

    def step_reporter(self, start: float, end: float, phase: str):
        return lambda info: self.steps.append(int(info["step"]))

    def should_stop(self) -> bool:
        return False


@pytest.fixture
def on_meta(random_tiny) -> tuple[torch.nn.Module, DomainTensors]:
    """The worker's setup with the stand-in device: ``fresh_model()`` (a copy of the base on
    the device) with LoRA attached, and a dataset's tensors in host memory, as the worker
    keeps them (each batch must be moved to the device as it is used)."""
    model = attach_lora(copy.deepcopy(random_tiny).to("meta").eval(), AdapterConfig(rank=4))
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 256, 256, generator=generator) * 255
    masks = torch.zeros(4, 256, 256, dtype=torch.bool)
    masks[:, 60:180, 40:200] = True
    return model, DomainTensors(images, masks, ("a", "b", "c", "d"))


def _lora_on(model: torch.nn.Module) -> set[str]:
    return {p.device.type for n, p in model.named_parameters() if "lora_" in n}


def test_training_statistics_and_scoring_stay_on_the_device(on_meta) -> None:
    model, data = on_meta
    assert _lora_on(model) == {"meta"}  # PEFT put the new LoRA weights beside the base ones
    job = Reporter()
    with StrictDevices() as mode:
        stats, metrics = fit_adapter(model, data.subset([0, 1, 2]), data.subset([3]),
                                     # interactive: its clicks are drawn on the host
                                     TrainParams(epochs=2, batch_size=2, rank=4,
                                                 interactive_rounds=2), job)
    assert mode.violations == []
    assert job.phases == ["train", "stats"] and job.steps == [1, 2, 3, 4]
    assert set(metrics) == {"holdout", "holdout_base", "train"}
    assert stats and all(v.device.type == "cpu" for v in stats.values())  # results come home
    assert mode.ops_on_meta > 1000  # the mode really saw the model's work


def test_evaluation_and_statistics_jobs_stay_on_the_device(on_meta) -> None:
    model, data = on_meta
    with StrictDevices() as mode:
        # Two clicks of the click protocol: it decodes on the device, places clicks on the host.
        scores = evaluate_chunks(unwrap(model), [data], EvaluateParams(batch_size=3, clicks=2),
                                 check=lambda: None)
        stats, seen = chunk_gram_stats(model, [data], batch_size=3, check=lambda: None)
    assert mode.violations == []
    assert scores["count"] == 4 and seen == 4 and stats
    assert scores["clicks"]["max_clicks"] == 2
    assert mode.ops_on_meta > 500


def test_the_check_catches_a_cpu_tensor_handed_to_the_model(on_meta) -> None:
    """The check can fail: prompts left on the CPU (what evaluate_points did before it moved
    them) are reported, as CUDA would refuse them."""
    model, data = on_meta
    sam = unwrap(model)
    coords = torch.full((1, 3, 2), 100.0)
    labels = torch.ones(1, 3, dtype=torch.int64)
    with StrictDevices() as mode, pytest.raises(AssertionError, match="devices mixed"):
        embedding = sam.image_encoder(data.images[:1].to("meta"))
        predict_masks_batched(sam, embedding, coords, labels)
    assert "cpu" in mode.violations[0] and "meta" in mode.violations[0]


def test_the_check_catches_a_batch_not_moved_to_the_device(on_meta) -> None:
    model, data = on_meta
    sam = unwrap(model)
    with StrictDevices() as mode, pytest.raises(AssertionError, match="devices mixed"):
        sam.image_encoder(data.images[:1])  # host memory, straight into the model
    assert len(mode.violations) == 1


def test_evaluation_on_device_held_inputs(on_meta) -> None:
    """Inputs already on the device (a caller's choice) are fine too."""
    model, data = on_meta
    with StrictDevices() as mode:
        scores = evaluate_points(unwrap(model), data.images.to("meta"),
                                 data.masks.to("meta"), batch_size=3)
    assert mode.violations == [] and set(scores) == {"iou", "dice", "mae"}
