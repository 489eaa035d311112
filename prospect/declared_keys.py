"""Every key of a composed config is declared somewhere: an unknown key (`+eval.sentence_modle=...`, a typo in a
user's preset) is refused in one line naming it and the keys allowed, before anything loads; so is a declared
key deleted with `~`.

What declares a key: the YAML files of the job's own group options (conf/config.yaml and the chosen
`model`/`strategy`/`dataset`/`eval`/`logger` file), i.e. the config the job would compose with the same
choices and no key overrides. A strategy key may also be one of its class's fields, or a key of another
strategy option (prospect.validation passes them all): strategies ignore the parameters they do not use (as
`last_keep_len`), so that one sweep over several strategies can set one strategy's key
(`-m strategy=drop_middle,summarize_and_drop ++strategy.summary_max_new_tokens=128`), and each of its jobs
passes alone as in the sweep. An `experiment` preset
sets keys but declares none: a key it sets in a group must be declared by one of that group's options, so a
typo in a preset is refused too. The `stream` and `summary` nodes are checked by their owners
(prospect.validation), which know their keys.

Light on purpose (omegaconf and Hydra's compose only).
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from prospect.conf_files import group_options, search_dirs
from prospect.config_values import ConfigError

CHOSEN_GROUPS = ("model", "strategy", "dataset", "eval", "logger", "experiment")
OWN_CHECKS = ("stream", "summary", "hydra")  # nodes whose keys prospect.validation checks itself (hydra: Hydra's)


@dataclass(frozen=True)
class DeclaredKeys:
    """allowed: every key a job may have (nested dicts); required: those its chosen options declare, which it
    must keep (a `~key` deletion is refused)."""

    allowed: dict
    required: dict


def declared_config(choices: Mapping[str, str | None], config_name: str, conf_dir: Path, search_path: Iterable[str] = (),
                    strategies: Iterable[str] = ()) -> DeclaredKeys:
    """The keys a job with these group choices may and must have. `strategies`: the strategy options the whole
    command runs (a sweep's), whose keys every one of its jobs may be given."""
    picked = tuple(sorted((group, str(value)) for group, value in choices.items()
                          if group in CHOSEN_GROUPS and value is not None))
    return _declared(picked, config_name, str(conf_dir), tuple(str(entry) for entry in search_path),
                     tuple(sorted(set(strategies))))


@lru_cache(maxsize=64)
def _declared(picked: tuple[tuple[str, str], ...], config_name: str, conf_dir: str, search_path: tuple[str, ...],
              strategies: tuple[str, ...]) -> DeclaredKeys:
    options = tuple((group, value) for group, value in picked if group != "experiment")
    required = _compose(options, config_name, conf_dir, search_path)
    allowed = copy.deepcopy(required)
    if isinstance(allowed.get("strategy"), dict):
        for key, value in _keys_of_options("strategy", conf_dir, search_path, strategies).items():
            allowed["strategy"].setdefault(key, value)
    experiment = dict(picked).get("experiment")
    if experiment is not None:
        preset = _preset_values(experiment, options, config_name, conf_dir, search_path)
        for group in CHOSEN_GROUPS:
            if isinstance(preset.get(group), dict) and isinstance(allowed.get(group), dict):
                _add_keys_of_other_options(preset[group], allowed[group], _keys_of_options(group, conf_dir, search_path))
    return DeclaredKeys(allowed, required)


@lru_cache(maxsize=16)
def _preset_values(experiment: str, options: tuple[tuple[str, str], ...], config_name: str, conf_dir: str,
                   search_path: tuple[str, ...]) -> dict:
    """The config with the preset (and the choices but the strategy, which a preset's keys do not depend on)."""
    others = tuple((group, value) for group, value in options if group != "strategy")
    return _compose((*others, ("experiment", experiment)), config_name, conf_dir, search_path)


@lru_cache(maxsize=64)
def _compose(overrides: tuple[tuple[str, str], ...], config_name: str, conf_dir: str, search_path: tuple[str, ...]) -> dict:
    texts = [f"{group}={value}" for group, value in overrides]
    if search_path:
        texts.append(f"hydra.searchpath=[{','.join(search_path)}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=texts)
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=False)


@lru_cache(maxsize=32)
def _keys_of_options(group: str, conf_dir: str, search_path: tuple[str, ...], only: tuple[str, ...] | None = None) -> dict:
    """Every key the group's options declare (`only`: those options), nested nodes merged, from their YAML files
    as written."""
    keys: dict = {}
    for root in (Path(conf_dir), *search_dirs(search_path)):
        for option in group_options(group, root):
            if only is not None and option not in only:
                continue
            document = OmegaConf.to_container(OmegaConf.load(root / group / f"{option}.yaml"), resolve=False)
            if isinstance(document, dict):
                document.pop("defaults", None)
                _merge_keys(keys, document)
    return keys


def _merge_keys(into: dict, document: Mapping) -> None:
    for key, value in document.items():
        if isinstance(value, dict):
            into[key] = into[key] if isinstance(into.get(key), dict) else {}
            _merge_keys(into[key], value)
        else:
            into.setdefault(key, value)


def _add_keys_of_other_options(preset: Mapping, declared: dict, keys: Mapping) -> None:
    """Declare the keys a preset sets in a group that another option of the group declares."""
    for key, value in preset.items():
        if key not in declared:
            if key in keys:
                declared[key] = value
        elif isinstance(value, dict) and isinstance(declared[key], dict) and isinstance(keys.get(key), dict):
            _add_keys_of_other_options(value, declared[key], keys[key])


def check_declared_keys(cfg: DictConfig, declared: DeclaredKeys, strategy_fields: Iterable[str] | None = ()) -> None:
    """Raise ConfigError for the first key of `cfg` (at any depth) that is not allowed, then for the first
    required key it lacks; a strategy key may also be one of `strategy_fields` (its class's parameters; None:
    the strategy's keys are not checked here, its class cannot be imported or takes any keyword)."""
    given = OmegaConf.to_container(cfg, resolve=False)
    _check_node(given, declared.allowed, "", extra=())
    strategy = given.get("strategy")
    if strategy_fields is not None and isinstance(strategy, dict) and isinstance(declared.allowed.get("strategy"), dict):
        _check_node(strategy, declared.allowed["strategy"], "strategy", extra=tuple(strategy_fields))
    _check_present(given, declared.required, "")


def _check_node(given: Mapping, declared: Mapping, path: str, extra: tuple[str, ...]) -> None:
    for key, value in given.items():
        name = f"{path}.{key}" if path else str(key)
        if not path and key in OWN_CHECKS:
            continue
        if key not in declared and key not in extra:
            allowed = list(declared) + [field for field in extra if field not in declared]
            guess = difflib.get_close_matches(str(key), [str(k) for k in allowed], n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            where = path or "the config"
            raise ConfigError(f"{name}: unknown key{hint}; {where} has: {', '.join(str(k) for k in allowed)}")
        if path == "" and key == "strategy":
            continue  # checked with the strategy's fields (check_declared_keys)
        if isinstance(value, dict) and key in declared and not isinstance(declared[key], dict) and value:
            raise ConfigError(f"{name}.{next(iter(value))}: unknown key; {name} is a value, not a group of keys")
        if isinstance(value, dict) and isinstance(declared.get(key), dict):
            _check_node(value, declared[key], name, extra=())


def _check_present(given: Mapping, required: Mapping, path: str) -> None:
    for key, value in required.items():
        name = f"{path}.{key}" if path else str(key)
        if not path and key in OWN_CHECKS:
            continue
        if key not in given:
            raise ConfigError(f"{name}: missing (deleted with ~?); every job needs the keys its config files declare")
        if isinstance(value, dict) and isinstance(given[key], dict):
            _check_present(given[key], value, name)
