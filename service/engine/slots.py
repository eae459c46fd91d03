"""Adapter slots: the checks an adapter passes before it is served, and PEFT loading it.

Every adapter the engine serves (the live one, each loaded domain) is loaded as a named PEFT
adapter ("slot") of the same ``PeftModel`` (PEFT's own config handling and state-dict
loading), whose LoRA factors the adapter table then copies into the serving encoder's bank
and deletes from the ``PeftModel`` again. Slot names are unique per load (``slot7``), so two
loads of the same version or domain never share cached embeddings.

The engine decodes masks without its lock, so an adapter may only ever touch the image
encoder: :func:`check_adapter_files` proves that from the config and the weights *before* the
model is changed, and refuses anything that would alter the base weights (LoRA bias,
``modules_to_save``) or reach the prompt encoder or mask decoder.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from segment_anything.modeling import Sam

from regcl.adapters import AdapterFiles
from service.engine.errors import AdapterRejectedError

logger = logging.getLogger(__name__)

PLACEHOLDER = "default"
"""The adapter PEFT needs to exist: rank 1, zero B, never made active (base runs with
adapters disabled)."""

MAX_ABS_WEIGHT = 1e4
"""Largest LoRA weight magnitude served. Trained LoRA factors stay far below 1; factors of
~1e10 are finite yet overflow the encoder's attention, and every score becomes NaN."""

ENCODER_PREFIX = "image_encoder."
WEIGHT_PREFIX = "base_model.model." + ENCODER_PREFIX


@dataclass(frozen=True)
class AdapterSlot:
    """One adapter being served.

    key: the PEFT adapter name, unique per load; it is the embedding cache's version key.
    label: what responses report (``live:3``, ``domain:polyp``). kind: ``live`` or ``domain``.
    name: the domain name (``live`` for the live adapter). version: the live version, or None.
    revision: the content hash of a domain adapter loaded from the registry (None otherwise),
    so that a new upload under the same name is loaded again.
    """

    key: str
    label: str
    kind: str
    name: str
    version: int | None
    source: str
    loaded_at: float
    revision: str | None = None


def check_adapter_files(sam: Sam, files: AdapterFiles, source: str) -> LoraConfig:
    """Refuse an adapter that could not be served safely; returns a private copy of its config.

    Checks, without changing ``sam``: a plain LoRA config (bias ``none``, no
    ``modules_to_save``, no parameter targets, no layer replication) whose targets exist and
    all lie in the image encoder; weights under the image encoder, floating point, finite and
    at most :data:`MAX_ABS_WEIGHT` in magnitude.
    Shapes are checked once the slot exists (:func:`add_slot`).
    """
    config = files.config
    if not isinstance(config, LoraConfig):
        raise AdapterRejectedError(f"{source}: not a LoRA config ({type(config).__name__})")
    config = copy.deepcopy(config)
    if config.bias != "none":
        raise AdapterRejectedError(f"{source}: LoRA bias={config.bias!r} changes base weights; "
                                   "only bias='none' can be served")
    for option in ("modules_to_save", "target_parameters", "layer_replication",
                   "trainable_token_indices"):
        if getattr(config, option, None):
            raise AdapterRejectedError(f"{source}: {option} is not supported in served adapters")
    if config.target_modules is None or config.target_modules == "all-linear":
        raise AdapterRejectedError(f"{source}: target_modules must name image-encoder layers, "
                                   f"got {config.target_modules!r}")
    matched = _matched_modules(sam, config)
    if not matched:
        raise AdapterRejectedError(f"{source}: its targets match no layer of this model")
    outside = [key for key in matched if not key.startswith(ENCODER_PREFIX)]
    if outside:
        raise AdapterRejectedError(f"{source}: LoRA outside the image encoder is not served "
                                   f"(e.g. {outside[:2]})")
    outside = [key for key in files.weights if not key.startswith(WEIGHT_PREFIX)]
    if outside:
        raise AdapterRejectedError(f"{source}: weights outside the image encoder "
                                   f"(e.g. {outside[:2]})")
    for key, value in files.weights.items():
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise AdapterRejectedError(f"{source}: {key} has non-finite or non-float values")
        if value.numel() and value.abs().max().item() > MAX_ABS_WEIGHT:
            raise AdapterRejectedError(f"{source}: {key} has values of magnitude "
                                       f"{value.abs().max().item():.3g}, above {MAX_ABS_WEIGHT:g}"
                                       " (the model's arithmetic would overflow)")
    return config


def adapted_outside_encoder(sam: Sam) -> list[str]:
    """LoRA layers of ``sam`` outside its image encoder (in the prompt encoder or the mask
    decoder); :func:`check_adapter_files` keeps this empty, so one decoder serves every
    adapter version (the browser's ``decoder.onnx`` relies on it)."""
    return [f"{part}.{key}" for part in ("prompt_encoder", "mask_decoder")
            for key, module in getattr(sam, part).named_modules()
            if isinstance(module, BaseTunerLayer)]


def _matched_modules(sam: Sam, config: LoraConfig) -> list[str]:
    """Module names PEFT would wrap for ``config`` (its own matching rule, same skip of the
    internals of layers that already carry adapters)."""
    wrapped: list[str] = []
    matched: list[str] = []
    for key, module in sam.named_modules():
        if not key or any(key.startswith(prefix) for prefix in wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapped.append(key + ".")
        if check_target_module_exists(config, key):
            matched.append(key)
    return matched


def add_slot(model: PeftModel, key: str, config: LoraConfig, files: AdapterFiles,
             source: str) -> None:
    """Add adapter ``key`` to ``model`` with ``files``' weights; on any failure remove it again
    and raise :class:`AdapterRejectedError`. The caller holds the model lock."""
    try:
        model.add_adapter(key, config)
    except Exception as exc:  # PEFT refuses layer types, bad ranks, ... with many kinds
        raise AdapterRejectedError(f"{source}: PEFT cannot add this adapter: {exc}") from exc
    try:
        expected = get_peft_model_state_dict(model, adapter_name=key)
        _check_against(expected, files.weights, source)
        result = set_peft_model_state_dict(model, files.weights, adapter_name=key)
        if getattr(result, "unexpected_keys", None):
            raise AdapterRejectedError(f"{source}: unexpected keys {result.unexpected_keys[:3]}")
    except Exception as exc:
        remove_slot(model, key)
        if isinstance(exc, AdapterRejectedError):
            raise
        raise AdapterRejectedError(f"{source}: cannot load weights: {exc}") from exc


def _check_against(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                   source: str) -> None:
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise AdapterRejectedError(
            f"{source}: adapter weights do not fit its config on this model: {len(missing)} "
            f"missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
    for name, value in weights.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise AdapterRejectedError(f"{source}: {name} has shape {tuple(value.shape)}, the "
                                       f"model needs {tuple(expected[name].shape)}")


def remove_slot(model: PeftModel, key: str) -> None:
    """Delete adapter ``key``. The placeholder is made active first so PEFT never has to pick
    a new active adapter per layer. The caller holds the model lock."""
    model.set_adapter(PLACEHOLDER, inference_mode=True)
    if key in model.peft_config:
        model.delete_adapter(key)
