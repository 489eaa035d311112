"""The strategy registry: every option of conf/strategy/ by name (a strategy is one file plus one YAML), and
how a strategy is built from a config or by name (the seed's ContextStrategyFactory)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

from hydra.utils import get_class
from omegaconf import OmegaConf

from prospect.conf_files import strategy_targets

from prospect.context_strategies.base import POSITION_MODES, BaseContextStrategy, ContextOverflowError  # noqa: F401
from prospect.context_strategies.budget import BudgetKeep, ScoredKeep, TextFirstKeep  # noqa: F401  (the package's API)

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
    params = OmegaConf.to_container(strategy_cfg, resolve=True) if not isinstance(strategy_cfg, dict) else dict(strategy_cfg)
    target = params.pop("_target_")
    params.pop("name", None)
    return _instantiate(get_class(target), params)
