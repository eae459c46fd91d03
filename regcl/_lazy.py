"""Lazy package exports (PEP 562).

A package lists what it offers (name → submodule) without importing anything, so importing
one light module of it (``regcl.merging.catalogue``, ``regcl.adapters.layout``) does not load
torch or PEFT; ``from regcl.merging import merge_adapters`` imports the submodule on first use.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module ``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps each public
    name to the submodule (relative to ``package``) that defines it; other attribute names are
    tried as submodules."""

    def get_attribute(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def names() -> list[str]:
        return sorted(set(exports) | set(vars(sys.modules[package])))

    return get_attribute, names
