"""The naming rule of everything a user names: adapters, domains, datasets (and the names the
continual step derives from a domain). Stated once here; the registry, the sample sets, the
job parameters, the engine and the API's document all use it.

A name is lower-case letters, digits, ``_`` and ``-``, starting with a letter or a digit, at
most 64 characters (a domain at most 48: the continual step names its datasets
``<domain>-s<n>-heldout``). ``base``, ``live`` and ``auto`` name what a request's ``adapter``
means besides a stored adapter (the model with no adapter, the live merged version, the
domain router's choice), so nothing new may take them.
"""

from __future__ import annotations

import re
from typing import Any

from infra.errors import InvalidName

__all__ = [
    "AUTO",
    "BASE",
    "LIVE",
    "MAX_DOMAIN_LENGTH",
    "MAX_NAME_LENGTH",
    "RESERVED_NAMES",
    "name_schema",
    "validate_name",
]

_FIRST, _REST = "[a-z0-9]", "[a-z0-9_-]"
MAX_NAME_LENGTH = 64
MAX_DOMAIN_LENGTH = 48
BASE, LIVE, AUTO = RESERVED_NAMES = ("base", "live", "auto")


def _pattern(max_length: int) -> str:
    return f"{_FIRST}{_REST}{{0,{max_length - 1}}}"


def validate_name(name: object, what: str = "name", *, new: bool = False,
                  max_length: int = MAX_NAME_LENGTH) -> str:
    """``name`` if it follows the rule (and, when ``new``, is not reserved), else InvalidName
    naming ``what`` (e.g. "adapter name")."""
    if not isinstance(name, str) or not re.fullmatch(_pattern(max_length), name):
        raise InvalidName(f"invalid {what} {name!r}: use lower-case letters, digits, _ and -, "
                          f"starting with a letter or digit, at most {max_length} characters")
    if new and name in RESERVED_NAMES:
        raise InvalidName(f"{what} {name!r} is reserved (a request's adapter "
                          f"{', '.join(RESERVED_NAMES)} means the model's own); pick another")
    return name


def name_schema(*, new: bool = False, max_length: int = MAX_NAME_LENGTH) -> dict[str, Any]:
    """The rule as JSON Schema keywords, for the API's document (``new``: reserved names
    excluded)."""
    reserved = f"(?!({'|'.join(RESERVED_NAMES)})$)" if new else ""
    return {"pattern": f"^{reserved}{_pattern(max_length)}$", "minLength": 1,
            "maxLength": max_length}
