"""Context strategies: one small class per strategy, one file each, plus one YAML in conf/strategy/ (the
registry reads those); the cache surgery lives in prospect.cache. docs/strategies.md says what each keeps;
docs/extending.md how to add one.

    from prospect.context_strategies import ContextStrategyFactory, BaseContextStrategy
    strategy = ContextStrategyFactory.create_strategy(strategy_type="drop_middle", max_seq_len=4096,
                                                      reserved_seq_len=128, last_keep_len=512)

A new strategy subclasses BaseContextStrategy (should_reduce_cache, handle_overflow, name), or, to keep
at most last_keep_len tokens after the initial cache, ScoredKeep (define `score`) or TextFirstKeep (define
`choose_frame_tokens`); it is selected with strategy=NAME (its YAML) or strategy._target_=package.module.Class.

The package itself is light: `events` (the reduction events a trace names) loads without torch, so tracking
and the sweep launchers can read it; everything else (the registry, the base classes, each strategy class by
its name) loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from prospect.context_strategies.events import REDUCTION_EVENTS  # noqa: F401  (light: no torch)


def __getattr__(name: str) -> Any:
    """Lazy: the registry (and torch with it) loads when a strategy name is first used, not when a light
    module imports the reduction events."""
    if name.startswith("__"):
        raise AttributeError(name)
    registry = importlib.import_module("prospect.context_strategies.registry")
    if hasattr(registry, name):
        return getattr(registry, name)
    for cls in registry.STRATEGIES.values():  # a strategy class by its class name (DropMiddle, ...)
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'prospect.context_strategies' has no attribute '{name}'")
