"""The base-model rule, stated once: an adapter or version records the fingerprint of the base
SAM it was made on (``metadata["base_fingerprint"]``, :func:`regcl.models.model_fingerprint`,
with ``metadata["base_model"]`` naming it); one made on another base, or naming another
model, is refused.

The API checks uploads and merge submissions with it, the workers every adapter and version
they load. One without a fingerprint (a plain PEFT upload) is accepted with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from infra.errors import BaseModelMismatch

__all__ = ["base_metadata", "check_base_model", "check_base_model_name", "same_base_model"]

logger = logging.getLogger(__name__)


def base_metadata(model: str, fingerprint: str) -> dict[str, str]:
    """What an adapter or version records about the base model it is made on."""
    return {"base_model": model, "base_fingerprint": fingerprint}


def same_base_model(metadata: Mapping[str, Any], fingerprint: str) -> bool:
    """Whether ``metadata`` was made on the base with ``fingerprint`` (True if it records
    none)."""
    return metadata.get("base_fingerprint", fingerprint) == fingerprint


def check_base_model_name(claimed: object, model: str, what: str) -> None:
    """BaseModelMismatch if ``claimed`` (what ``what`` says its base model is: a metadata
    field, PEFT's ``base_model_name_or_path``) names another model than ``model``; None or
    empty claims nothing."""
    if claimed is not None and claimed != "" and claimed != model:
        raise BaseModelMismatch(f"{what} names base model {claimed!r}; this deployment runs "
                                f"{model!r}")


def check_base_model(metadata: Mapping[str, Any], model: str, fingerprint: str,
                     what: str) -> None:
    """BaseModelMismatch if ``metadata`` (of ``what``, e.g. "adapter 'polyp'") names another
    model than ``model`` or records another base fingerprint than ``fingerprint``; a warning if
    it records no fingerprint."""
    check_base_model_name(metadata.get("base_model"), model, what)
    theirs = metadata.get("base_fingerprint")
    if theirs is None:
        logger.warning("%s records no base model fingerprint; assuming it fits", what)
    elif theirs != fingerprint:
        raise BaseModelMismatch(
            f"{what} was made on base model {metadata.get('base_model', '?')!r} (fingerprint "
            f"{theirs}), but this deployment runs {model!r} (fingerprint {fingerprint}); it "
            "cannot be used with this base model")
