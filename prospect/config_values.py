"""Typed reads of a composed config's values, each failing with one line naming the key: the bottom layer
of the config checks (prospect.validation and each group's owner: data, eval, models, tracking).

Light on purpose (stdlib and omegaconf only). `path` is the dotted node the key sits in ("config" for the
top level), so that a message names the key as it is typed on the command line.
"""

from __future__ import annotations

from typing import Any, Iterable

from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue


class ConfigError(ValueError):
    """A bad config value; str() is one line naming the key, the value and what is allowed."""


def first_line(error: Exception) -> str:
    """An exception's message on one line (Hydra and OmegaConf add context lines; a `Key '...'` line is kept)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if len(lines) > 1 and lines[1].startswith("Key '"):
        text = f"{text} {lines[1]}"
    return text


def key_name(path: str, key: str) -> str:
    """The dotted key as typed on the command line (top-level keys have no prefix)."""
    return key if path == "config" else f"{path}.{key}"


def get_value(node: DictConfig, key: str, path: str) -> Any:
    if key not in node:
        raise ConfigError(f"{key_name(path, key)}: missing")
    try:
        return node[key]
    except (InterpolationResolutionError, MissingMandatoryValue) as error:
        raise ConfigError(f"{key_name(path, key)}: {first_line(error)}") from None


def get_int(node: DictConfig, key: str, path: str, minimum: int | None = None, optional: bool = False) -> int | None:
    value = get_value(node, key, path)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key_name(path, key)}={value}: must be an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key_name(path, key)}={value}: must be >= {minimum}")
    return value


def get_bool(node: DictConfig, key: str, path: str) -> bool:
    value = get_value(node, key, path)
    if not isinstance(value, bool):
        raise ConfigError(f"{key_name(path, key)}={value}: must be true or false")
    return value


def get_number(node: DictConfig, key: str, path: str, low: float, high: float, low_open: bool = False) -> float:
    value = get_value(node, key, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key_name(path, key)}={value}: must be a number")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ConfigError(f"{key_name(path, key)}={value}: must be in {bracket}{low}, {high}]")
    return float(value)


def get_choice(node: DictConfig, key: str, path: str, allowed: Iterable[Any]) -> Any:
    value = get_value(node, key, path)
    allowed = tuple(allowed)
    if value not in allowed:
        shown = ", ".join("null" if a is None else str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)
        raise ConfigError(f"{key_name(path, key)}={value}: choose one of: {shown}")
    return value
