"""The plain-type check of a config dataclass's fields (strategies, stream settings): stdlib only."""

from __future__ import annotations

import dataclasses
from typing import Any

_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def check_field_types(strategy: Any) -> None:
    """Raise ValueError `name=value: must be ...` for a dataclass field whose value is not of its declared
    plain type (int, float, str, bool; a bool is not an int)."""
    for field in dataclasses.fields(strategy):
        declared = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        if declared not in _TYPES:
            continue
        value = getattr(strategy, field.name)
        if (isinstance(value, bool) and declared != "bool") or not isinstance(value, _TYPES[declared]):
            raise ValueError(f"{field.name}={value}: must be {_TYPE_WORDS[declared]}")
