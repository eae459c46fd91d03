"""LoRA domain adapters on segment-anything's ``Sam``, in PEFT's own on-disk format.

An adapter directory holds what plain PEFT writes and reads (``adapter_config.json``,
``adapter_model.safetensors``) plus regcl's two files: ``regcl_stats.safetensors`` (the Gram
statistics RegCL merges with) and ``regcl_adapter.json`` (domain, base model, metrics). So an
adapter made here loads with ``PeftModel.from_pretrained`` and one made with plain PEFT loads
here (it can be served; it can be RegCL-merged once statistics are computed for it).
Nothing is ever unpickled: weight files other than safetensors are refused.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from segment_anything.modeling import Sam

from regcl.adapters.config import AdapterConfig
from regcl.adapters.layout import (
    CONFIG_FILE,
    META_FILE,
    STATS_FILE,
    UNSAFE_SUFFIXES,
    WEIGHTS_FILE,
    count_key,
    gram_key,
    mean_key,
)
from regcl.errors import AdapterError, CheckpointNotFoundError, StatsError

logger = logging.getLogger(__name__)


def attach_lora(sam: Sam, config: AdapterConfig | LoraConfig = AdapterConfig(),
                seed: int | None = None) -> PeftModel:
    """Wrap ``sam`` (in place, as PEFT does) with a fresh, trainable LoRA adapter.

    Only the LoRA weights require grad; the base model stays frozen. ``seed``: draw the
    initial LoRA weights with :func:`seeded_lora_init` (without it PEFT draws them from torch's
    global generator, whose start differs from process to process). Returns the PeftModel.
    """
    depth = len(sam.image_encoder.blocks)
    peft_config = config.to_peft(depth) if isinstance(config, AdapterConfig) else config
    model = get_peft_model(sam, peft_config)
    if seed is not None:
        load_weights_into(model, seeded_lora_init(model, seed), f"seeded init {seed}")
    return model


def seeded_lora_init(model: PeftModel, seed: int) -> dict[str, torch.Tensor]:
    """PEFT's default LoRA initialisation drawn from a generator seeded with ``seed``.

    lora_A: Kaiming-uniform with a = √5 (as PEFT), drawn in sorted key order; lora_B: zeros,
    so the adapter starts as a no-op. Returns the weights in PEFT's saved naming (CPU, fp32);
    the same seed gives the same weights in every process.
    """
    gen = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for key, value in sorted(get_peft_model_state_dict(model).items()):
        fresh = torch.zeros(value.shape, dtype=value.dtype)
        if ".lora_A." in key:
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
        weights[key] = fresh
    return weights


def unwrap(model: PeftModel | Sam) -> Sam:
    """The ``Sam`` inside a PeftModel (or the model itself)."""
    return model.base_model.model if isinstance(model, PeftModel) else model


def adapter_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's weights in PEFT's saved naming, detached copies on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def check_weights(model: PeftModel, weights: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights that do not fit ``model``'s adapter: other keys, shapes or non-finite."""
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise AdapterError(
            f"{source}: adapter targets do not fit the model: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected "
            f"(e.g. {extra[:2]})"
        )
    for key, value in weights.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise AdapterError(f"{source}: {key} has shape {tuple(value.shape)}, the model "
                               f"needs {tuple(expected[key].shape)}")
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise AdapterError(f"{source}: {key} has non-finite or non-float values")


def load_weights_into(model: PeftModel, weights: dict[str, torch.Tensor],
                      source: str = "weights") -> None:
    """Replace the adapter's weights in place (same placement and rank), after checking them."""
    check_weights(model, weights, source)
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise AdapterError(f"{source}: unexpected keys {result.unexpected_keys[:3]}")


@dataclass
class AdapterFiles:
    """An adapter directory read and validated (not yet attached to any model)."""

    path: Path
    config: LoraConfig
    weights: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor] | None
    metadata: dict = field(default_factory=dict)


def read_adapter(directory: str | Path) -> AdapterFiles:
    """Read and validate an adapter directory without a model (safetensors only)."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"adapter directory not found: {path}")
    unsafe = sorted(p.name for p in path.iterdir() if p.suffix.lower() in UNSAFE_SUFFIXES)
    if unsafe:
        raise AdapterError(f"{path}: refusing pickle-based files {unsafe}; use safetensors")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise AdapterError(f"{path}: missing {name}")
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
        config = LoraConfig.from_pretrained(str(path))
    except Exception as exc:
        raise AdapterError(f"{path}/{CONFIG_FILE} is not a valid PEFT LoRA config: {exc}") from exc
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: only LoRA adapters are supported, got {raw['peft_type']}")
    weights = _read_safetensors(path / WEIGHTS_FILE)
    stats = _read_safetensors(path / STATS_FILE) if (path / STATS_FILE).is_file() else None
    metadata = {}
    if (path / META_FILE).is_file():
        try:
            metadata = json.loads((path / META_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise AdapterError(f"{path}/{META_FILE} is not valid JSON: {exc}") from exc
    if stats is not None:
        check_stats(weights, stats, str(path))
    return AdapterFiles(path, config, weights, stats, metadata)


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as exc:
        raise AdapterError(f"{file} is not a readable safetensors file: {exc}") from exc


def check_stats(weights: dict[str, torch.Tensor], stats: dict[str, torch.Tensor],
                source: str) -> None:
    """Statistics must cover every LoRA weight with a finite, square Gram of its input size;
    an optional ``.mean`` (statistics made before it was added lack it) must be a finite
    vector of that size."""
    for key, value in weights.items():
        gram, count = stats.get(gram_key(key)), stats.get(count_key(key))
        if gram is None or count is None:
            raise StatsError(f"{source}: statistics lack {gram_key(key)} / {count_key(key)}")
        n_in = value.shape[-1]
        if tuple(gram.shape) != (n_in, n_in):
            raise StatsError(f"{source}: {gram_key(key)} has shape {tuple(gram.shape)}, "
                             f"expected {(n_in, n_in)}")
        if count.numel() != 1 or count.is_floating_point():
            raise StatsError(f"{source}: {count_key(key)} must be one integer token count")
        if not torch.isfinite(gram).all() or int(count) <= 0:
            raise StatsError(f"{source}: {key} statistics are non-finite or empty")
        mean = stats.get(mean_key(key))
        if mean is not None and (tuple(mean.shape) != (n_in,) or not mean.is_floating_point()
                                 or not torch.isfinite(mean).all()):
            raise StatsError(f"{source}: {mean_key(key)} must be a finite float vector of size "
                             f"{n_in}")


def load_adapter(sam: Sam, directory: str | Path) -> tuple[PeftModel, AdapterFiles]:
    """Attach the adapter in ``directory`` to ``sam`` (wrapping it in place)."""
    files = read_adapter(directory)
    model = get_peft_model(sam, files.config)
    load_weights_into(model, files.weights, str(files.path))
    return model, files


def save_adapter(model: PeftModel, directory: str | Path, *,
                 stats: dict[str, torch.Tensor] | None = None, metadata: dict | None = None,
                 weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a PEFT adapter directory plus regcl's statistics and metadata.

    ``weights`` overrides the model's current adapter weights (e.g. a merge result). Files are
    written to a temporary sibling directory that is renamed into place, so a crash never
    leaves a half-written adapter at ``directory``.
    """
    path = Path(directory)
    weights = adapter_weights(model) if weights is None else weights
    check_weights(model, weights, str(path))
    if stats is not None:
        check_stats(weights, stats, str(path))
    tmp = path.with_name(f".{path.name}.tmp-{time.time_ns()}")
    tmp.mkdir(parents=True)
    config = model.peft_config["default"]
    config.save_pretrained(str(tmp))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE),
              metadata={"format": "pt"})
    if stats is not None:
        save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp / STATS_FILE))
    meta = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(metadata or {})}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=_jsonable))
    if path.exists():
        raise AdapterError(f"{path} exists already; adapters are never overwritten")
    tmp.rename(path)
    return path


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)
