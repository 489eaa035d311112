"""Every key of a composed config is declared somewhere: an unknown key (`+eval.sentence_modle=...`, a typo in a
user's preset) is refused in one line naming it and the keys allowed, before anything loads.

What declares a key: the YAML files of the job's own group options (conf/config.yaml and the chosen
`model`/`strategy`/`dataset`/`eval`/`logger` file), i.e. the config the job would compose with the same
choices and no key overrides. A strategy key may also be one of its class's fields or a key another strategy
option declares: strategies ignore the parameters they do not use (as `last_keep_len`), so that one sweep
over several strategies can set one strategy's key (`++strategy.summary_max_new_tokens=128`). An `experiment`
preset sets keys but declares none: a key it sets in a group must be declared by one of that group's options,
so that a typo in a preset is refused too. The `stream` and `summary` nodes are checked by their owners
(prospect.validation), which know their keys.

Light on purpose (omegaconf and Hydra's compose only).
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from prospect.conf_files import group_options, search_dirs
from prospect.config_values import ConfigError

CHOSEN_GROUPS = ("model", "strategy", "dataset", "eval", "logger", "experiment")
OWN_CHECKS = ("stream", "summary", "hydra")  # nodes whose keys prospect.validation checks itself (hydra: Hydra's)


def declared_config(choices: Mapping[str, str | None], config_name: str, conf_dir: Path,
                    search_path: Iterable[str] = ()) -> dict:
    """The config (a plain dict, interpolations unresolved) composed from the same group choices and nothing
    else: every key in it is declared by a YAML file of the job's options."""
    picked = tuple(sorted((group, str(value)) for group, value in choices.items()
                          if group in CHOSEN_GROUPS and value is not None))
    return _declared(picked, config_name, str(conf_dir), tuple(str(entry) for entry in search_path))


@lru_cache(maxsize=64)
def _declared(picked: tuple[tuple[str, str], ...], config_name: str, conf_dir: str, search_path: tuple[str, ...]) -> dict:
    options = [(group, value) for group, value in picked if group != "experiment"]
    declared = _compose(options, config_name, conf_dir, search_path)
    if isinstance(declared.get("strategy"), dict):
        for key, value in _keys_of_options("strategy", conf_dir, search_path).items():
            declared["strategy"].setdefault(key, value)
    if len(options) == len(picked):
        return declared
    preset = _compose(list(picked), config_name, conf_dir, search_path)
    for group in CHOSEN_GROUPS:
        if isinstance(preset.get(group), dict) and isinstance(declared.get(group), dict):
            _add_keys_of_other_options(preset[group], declared[group], _keys_of_options(group, conf_dir, search_path))
    return declared


def _compose(overrides: list[tuple[str, str]], config_name: str, conf_dir: str, search_path: tuple[str, ...]) -> dict:
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


def _keys_of_options(group: str, conf_dir: str, search_path: tuple[str, ...]) -> dict:
    """Every key any option of the group declares (nested nodes merged), from its YAML files as written."""
    keys: dict = {}
    for root in (Path(conf_dir), *search_dirs(search_path)):
        for option in group_options(group, root):
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


def check_declared_keys(cfg: DictConfig, declared: Mapping[str, Any], strategy_fields: Iterable[str] | None = ()) -> None:
    """Raise ConfigError for the first key of `cfg` (at any depth) that `declared` does not have; a strategy
    key may also be one of `strategy_fields` (its class's parameters; None: the strategy is not checked here,
    its class cannot be imported or takes any keyword)."""
    given = OmegaConf.to_container(cfg, resolve=False)
    _check_node(given, declared, "", extra=())
    strategy = given.get("strategy")
    if strategy_fields is not None and isinstance(strategy, dict) and isinstance(declared.get("strategy"), dict):
        _check_node(strategy, declared["strategy"], "strategy", extra=tuple(strategy_fields))


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
        if isinstance(value, dict) and isinstance(declared.get(key), dict):
            _check_node(value, declared[key], name, extra=())
