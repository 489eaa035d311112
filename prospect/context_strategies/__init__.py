"""Context strategies: one small class per strategy; the cache surgery lives in prospect.cache.

    from prospect.context_strategies import ContextStrategyFactory, BaseContextStrategy
    strategy = ContextStrategyFactory.create_strategy(strategy_type="drop_middle", max_seq_len=4096,
                                                      reserved_seq_len=128, last_keep_len=512)

A new strategy subclasses BaseContextStrategy (should_reduce_cache, handle_overflow, name), or, to keep
at most last_keep_len tokens after the initial cache, ScoredKeep (define `score`) or TextFirstKeep (define
`choose_frame_tokens`); it is selected from the command line with strategy._target_=package.module.Class.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

from prospect.conf_files import strategy_targets

from prospect.context_strategies.base import POSITION_MODES, BaseContextStrategy, ContextOverflowError
from prospect.context_strategies.budget import BudgetKeep, ScoredKeep, TextFirstKeep
from prospect.context_strategies.drop_all import DropAll
from prospect.context_strategies.drop_frames import DropFrames
from prospect.context_strategies.drop_middle import DropMiddle
from prospect.context_strategies.frame_coverage import FrameCoverage
from prospect.context_strategies.full import FullContext
from prospect.context_strategies.key_norm import KeyNorm
from prospect.context_strategies.none import NoContext
from prospect.context_strategies.snapkv import SnapKV
from prospect.context_strategies.streaming_llm import StreamingLLM
from prospect.context_strategies.summarize_and_drop import SummarizeAndDrop
from prospect.context_strategies.tar_van import TarVan

def _registered() -> dict[str, type[BaseContextStrategy]]:
    """Every strategy option of conf/strategy/ (the one source: a strategy is one file plus one YAML), by
    name, sorted: the class its YAML's `_target_` names."""
    classes = {}
    for name, target in strategy_targets().items():
        module, _, class_name = target.rpartition(".")
        classes[name] = getattr(importlib.import_module(module), class_name)
    return classes


STRATEGIES: dict[str, type[BaseContextStrategy]] = _registered()


def zoo_strategies() -> list[str]:
    """The strategies the zoo compares at equal memory: every registered one whose cache is bounded (all but
    `full`). experiment=strategy_zoo sweeps the same set (`glob(*,exclude=full)`); the bench times it."""
    return [name for name, cls in STRATEGIES.items() if cls.bounded]


__all__ = [
    "BaseContextStrategy", "BudgetKeep", "ContextOverflowError", "ContextStrategyFactory", "DropAll", "DropFrames",
    "DropMiddle", "FrameCoverage", "FullContext", "KeyNorm", "NoContext", "POSITION_MODES", "STRATEGIES", "ScoredKeep",
    "SnapKV", "StreamingLLM", "SummarizeAndDrop", "TarVan", "TextFirstKeep", "create_strategy", "strategy_from_config",
    "strategy_parameters", "zoo_strategies",
]


def strategy_parameters(cls: type) -> set[str] | None:
    """The parameters a strategy class takes (dataclass fields), or None if it takes any (**kwargs)."""
    signature = inspect.signature(cls.__init__)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls) if f.init}
    return {name for name in signature.parameters if name != "self"}


def _instantiate(cls: type, params: dict[str, Any]) -> BaseContextStrategy:
    accepted = strategy_parameters(cls)
    used = params if accepted is None else {k: v for k, v in params.items() if k in accepted}
    strategy = cls(**used)
    if not isinstance(strategy, BaseContextStrategy):
        raise TypeError(f"{cls.__module__}.{cls.__name__} is not a BaseContextStrategy")
    return strategy


def create_strategy(strategy_type: str, **params: Any) -> BaseContextStrategy:
    """A built-in strategy by name; parameters it does not use (e.g. last_keep_len for drop_all) are ignored."""
    if strategy_type not in STRATEGIES:
        raise ValueError(f"strategy_type={strategy_type}: choose one of: {', '.join(STRATEGIES)}")
    return _instantiate(STRATEGIES[strategy_type], params)


class ContextStrategyFactory:
    """The seed's entry point, kept for its users: ContextStrategyFactory.create_strategy(strategy_type=..., ...)."""

    create_strategy = staticmethod(create_strategy)


def strategy_from_config(strategy_cfg: Any) -> BaseContextStrategy:
    """Instantiate the `strategy` config group: `_target_` is the class, the other keys its parameters."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(strategy_cfg, resolve=True) if not isinstance(strategy_cfg, dict) else dict(strategy_cfg)
    target = params.pop("_target_")
    params.pop("name", None)
    return _instantiate(get_class(target), params)
