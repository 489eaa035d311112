"""Config checks that run before anything heavy loads: one line naming the key and the allowed values.

`check_command_line(argv)` runs before Hydra starts (unknown group options, unknown keys, and every job
of a sweep composed and validated up front); `validate(cfg)` checks one composed config, group by group:
each group's checks live with its owner (prospect.models, prospect.stream.settings, the strategy classes,
prospect.data, prospect.eval, prospect.tracking) on the typed reads of prospect.config_values.

A user's own config folders (`hydra.searchpath=[file:///their/conf]`) count: their YAML files are options of
their groups, composition reads them and sweeps (`strategy=a,b`, `glob(*)`) expand over them.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path
from typing import Iterable, Sequence

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import create_config_search_path, get_args_parser
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from prospect.conf_files import CONF_DIR, group_options
from prospect.config_values import ConfigError, first_line, get_bool, get_int, get_value
from prospect.data.config_checks import check_dataset
from prospect.declared_keys import DeclaredKeys, check_declared_keys, declared_config
from prospect.eval.config_checks import check_eval
from prospect.models.config_checks import check_model
from prospect.stream.settings import STREAM_MEASUREMENTS, StreamSettings, check_reply_fits
from prospect.tracking.config_checks import check_logger

__all__ = [
    "CONF_DIR", "GROUPS", "PATH_KEYS", "ConfigError", "check_command_line", "check_eval", "check_group_choice",
    "compose_config", "compose_job", "group_options", "quote_path_overrides", "validate",
]

GROUPS = ("model", "strategy", "dataset", "eval", "logger", "experiment")
SEARCHPATH = "hydra.searchpath"  # the one hydra override the checks keep: it adds config folders

PATH_KEYS = ("predictions", "dataset.root", "model.path", "paths.cache_dir", "cache_root", "hydra.run.dir", "hydra.sweep.dir")


def quote_path_overrides(argv: list[str], keys: tuple[str, ...] = PATH_KEYS) -> list[str]:
    """Quote a path value holding '=' or spaces (sweep job folders: `key=/m/0_a=1,b=2/x`) so Hydra's override
    grammar takes it literally; a plain comma list (`dataset.root=/a,/b` in a sweep) is left alone."""
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in keys and value and value[0] not in "'\"" and re.search(r"[=\s]", value):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
            arg = f"{key}={value}"
        quoted.append(arg)
    return quoted


def check_group_choice(group: str, value: str, conf_dir: Path = CONF_DIR, search_path: Iterable[str] = ()) -> None:
    options = group_options(group, conf_dir, search_path)
    if value not in options:
        raise ConfigError(f"{group}={value}: unknown {group}; choose one of: {', '.join(options) or '(none defined)'}")


def check_command_line(argv: list[str]) -> None:
    """Validate a `python -m prospect.run` command line without running it.

    Checks group choices (also inside sweeps), composes the config of every job the command would
    launch (all combinations of a multirun) and validates each. Raises ConfigError.
    """
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # argparse already printed its usage error
        raise ConfigError(f"cannot parse the command line: {' '.join(argv)}") from None
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    conf_dir = Path(args.config_dir).resolve() if args.config_dir else CONF_DIR
    config_name = args.config_name or "config"
    overrides = [o for o in args.overrides if not o.lstrip("~+").startswith("hydra") or _is_searchpath(o)]
    search_path = _search_path(overrides)
    for group, values in _group_overrides(overrides, conf_dir, search_path):  # (sweeper params of presets: per job below)
        for value in values:
            check_group_choice(group, value, conf_dir, search_path)
    lists = _job_override_lists(overrides, args.multirun, config_name, conf_dir, search_path)
    jobs = [compose_job(job_overrides, config_name, conf_dir) for job_overrides in lists]
    # a strategy may take any strategy option's keys (it ignores those it does not use): a sweep's job run alone
    # (the gpu_pool launcher starts each job as its own command) is checked as in its sweep
    strategies = set(group_options("strategy", conf_dir, search_path))
    checked = set()
    for job_overrides, (cfg, choices) in zip(lists, jobs):
        # Without + or ~ overrides a job's keys come from its YAML files only (Hydra refuses any other override),
        # which declare them but for the preset's: those are the same in every job whose other choices match
        others = tuple(sorted((group, str(value)) for group, value in choices.items() if group != "strategy"))
        keyed = any(_changes_keys(o) for o in job_overrides) or others not in checked
        checked.add(others)
        declared = declared_config(choices, config_name, conf_dir, search_path, strategies) if keyed else None
        validate(cfg, search_path, declared=declared)


def _changes_keys(override: str) -> bool:
    """A `+key=`, `++key=` or `~key` override (not a group choice such as `+experiment=x`): it adds or removes a key."""
    key = override.partition("=")[0].strip()
    return key[:1] in "+~" and key.lstrip("+~") not in GROUPS and not key.lstrip("+~").startswith("hydra")


def _is_searchpath(override: str) -> bool:
    return override.partition("=")[0].strip() == SEARCHPATH


def _search_path(overrides: list[str]) -> list[str]:
    """The entries of the command line's hydra.searchpath (the first one, as Hydra reads it), or []."""
    for text in filter(_is_searchpath, overrides):
        try:
            value = OverridesParser.create().parse_override(text).value()
        except HydraException:  # reported with every override that cannot be parsed (_group_overrides)
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{text}: must be a list of folders, e.g. {SEARCHPATH}=[file:///a,/b]")
        return [str(entry) for entry in value]
    return []


def compose_config(overrides: list[str], config_name: str = "config", conf_dir: Path = CONF_DIR) -> DictConfig:
    """Compose the job config the app would see (without the hydra node); errors become one line.
    A `hydra.searchpath=[...]` among the overrides adds its folders, as on the command line."""
    return compose_job(overrides, config_name, conf_dir)[0]


def compose_job(overrides: list[str], config_name: str = "config", conf_dir: Path = CONF_DIR
                ) -> tuple[DictConfig, dict[str, str | None]]:
    """(the job config without the hydra node, its group choices {group: option}), as compose_config."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            try:
                cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
                choices = dict(OmegaConf.to_container(cfg.hydra.runtime.choices))
                with open_dict(cfg):
                    del cfg["hydra"]
                return cfg, choices
            except (HydraException, OmegaConfBaseException) as error:
                message = first_line(error)
                unknown = re.match(r"Could not override '([^']+)'", message)
                if unknown:
                    message = _unknown_key_message(unknown.group(1), overrides, config_name, compose)
                raise ConfigError(message) from None
    finally:
        GlobalHydra.instance().clear()


def _unknown_key_message(key: str, overrides: list[str], config_name: str, compose) -> str:
    """`strategy.foo=3: unknown key; strategy has: ...` (composing without that override to list keys)."""
    offending = [o for o in overrides if o.split("=", 1)[0] == key]
    rest = [o for o in overrides if o not in offending]
    parent, _, _ = key.rpartition(".")
    try:
        node = compose(config_name=config_name, overrides=rest)
        node = OmegaConf.select(node, parent) if parent else node
        keys = ", ".join(str(k) for k in node.keys()) if isinstance(node, DictConfig) else ""
    except Exception:  # the listing is a courtesy; the key is still named
        keys = ""
    shown = offending[0] if offending else key
    where = parent or "the config"
    return f"{shown}: unknown key; {where} has: {keys}"


def _parser(conf_dir: Path = CONF_DIR, search_path: Iterable[str] = ()):
    """Hydra's override parser, with a config loader so that `glob(...)` sweeps over a group's options
    (those of conf_dir and of the search path's folders)."""
    config_search_path = create_config_search_path(str(conf_dir))
    for entry in search_path:
        config_search_path.append(provider=f"{SEARCHPATH} in command-line", path=entry)
    return OverridesParser.create(config_loader=ConfigLoaderImpl(config_search_path=config_search_path))


def _group_overrides(overrides: list[str], conf_dir: Path = CONF_DIR, search_path: Iterable[str] = ()
                     ) -> Iterable[tuple[str, list[str]]]:
    parser = _parser(conf_dir, search_path)
    for text in overrides:
        try:
            parser.parse_override(text)
        except HydraException as error:
            raise ConfigError(f"{text}: cannot parse this override ({first_line(error)})") from None
    parsed = parser.parse_overrides(overrides)
    for override in parsed:
        group = override.key_or_group
        if group not in GROUPS or override.is_delete() or override.package:
            continue
        if override.is_sweep_override():
            yield group, list(override.sweep_string_iterator())
        else:
            value = override.get_value_element_as_str()
            if value != "null":
                yield group, [value]


def _job_override_lists(overrides: list[str], multirun: bool, config_name: str = "config", conf_dir: Path = CONF_DIR,
                        search_path: Iterable[str] = ()) -> list[list[str]]:
    """The override list of every job the command launches (sweeper params of presets included)."""
    if not multirun:
        return [overrides]
    parser = _parser(conf_dir, search_path)
    plain = [o for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    params = _sweeper_params([o.input_line for o in plain], config_name, conf_dir)
    given = {o.key_or_group for o in parser.parse_overrides(overrides)}
    combined = [f"{k}={v}" for k, v in params.items() if k not in given] + overrides
    batches = BasicSweeper.split_arguments(parser.parse_overrides(combined), max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def _sweeper_params(overrides: list[str], config_name: str, conf_dir: Path) -> dict[str, str]:
    """hydra.sweeper.params set by the config (e.g. an experiment preset)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
        return {str(k): str(v) for k, v in params.items()}
    except Exception:  # composition errors are reported when the jobs are composed
        return {}
    finally:
        GlobalHydra.instance().clear()


# ---- checks of one composed config -------------------------------------------------------------


def validate(cfg: DictConfig, search_path: Sequence[str] | None = None, declared: DeclaredKeys | None = None) -> None:
    """Raise ConfigError (one line) for the first bad value in a composed config.

    search_path: the hydra.searchpath entries whose folders add group options (default: those of the running
    Hydra app, if any). declared: the keys the job's YAML files declare (prospect.declared_keys; the command
    line's check passes them): any other key is refused first."""
    if search_path is None:
        search_path = _running_search_path()
    for section in ("model", "strategy", "dataset", "eval", "logger", "stream"):
        if section not in cfg or not isinstance(cfg[section], DictConfig):
            raise ConfigError(f"{section}: missing from the config (did an override delete it?)")
    if declared is not None:
        check_declared_keys(cfg, declared, _strategy_fields(cfg.strategy))
    get_int(cfg, "seed", "config")
    get_bool(cfg, "cache", "config")
    check_model(cfg.model)
    _stream_settings(cfg.stream, cfg.seed)
    _check_strategy(cfg.strategy, cfg.stream, cfg.seed)
    check_dataset(cfg.dataset, search_path)
    check_eval(cfg.eval)
    check_logger(cfg.logger, search_path)
    _check_summary(cfg, search_path)


def _running_search_path() -> list[str]:
    """hydra.searchpath of the Hydra app this process runs (a job checked again when it starts), else []."""
    return [str(entry) for entry in HydraConfig.get().searchpath] if HydraConfig.initialized() else []


def _check_summary(cfg: DictConfig, search_path: Iterable[str] = ()) -> None:
    """summary.baseline: null, a job number >= 0 or the name of a strategy; no other key under `summary`."""
    summary, allowed = cfg.get("summary"), ("baseline",)
    if summary is None:
        return
    if not isinstance(summary, DictConfig):
        raise ConfigError(f"summary={summary}: must be a mapping with the keys: {', '.join(allowed)}")
    for key in summary:
        if key not in allowed:
            raise ConfigError(f"summary.{key}: unknown key; summary has: {', '.join(allowed)}")
    baseline = get_value(summary, "baseline", "summary") if "baseline" in summary else None
    strategies = group_options("strategy", search_path=search_path)
    if baseline is None or (isinstance(baseline, str) and (baseline in strategies or baseline == cfg.strategy.get("name")
                                                           or baseline.isdigit())):
        return
    if isinstance(baseline, int) and not isinstance(baseline, bool):
        if baseline < 0:
            raise ConfigError(f"summary.baseline={baseline}: must be >= 0 (a job number)")
        return
    shown = str(baseline).lower() if isinstance(baseline, bool) else baseline
    raise ConfigError(f"summary.baseline={shown}: must be null, a job number >= 0 or a strategy: {', '.join(strategies)}")


def _strategy_fields(strategy: DictConfig) -> tuple[str, ...] | None:
    """The parameters of the strategy's class (None: it cannot be imported, reported by _check_strategy, or
    it takes any keyword)."""
    from prospect.context_strategies.registry import strategy_parameters  # lazy: the strategies import torch

    module_name, _, class_name = str(strategy.get("_target_", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return None
    fields = strategy_parameters(cls)
    return None if fields is None else tuple(sorted(fields))


def _check_strategy(strategy: DictConfig, stream: DictConfig, seed: int) -> None:
    """Build the strategy and the stream settings from the config (nothing heavy loads): the rules live in
    their dataclasses (prospect.context_strategies, prospect.stream.settings.StreamSettings)."""
    from prospect.context_strategies import strategy_from_config  # lazy: the strategies import torch

    if "_target_" not in strategy:
        raise ConfigError("strategy._target_: missing (the class implementing the strategy)")
    target = str(strategy._target_)
    module_name, _, class_name = target.rpartition(".")
    try:
        getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"strategy._target_={target}: cannot import ({first_line(error)})") from None
    if "last_keep_len" in strategy:  # a shared key: checked even for the strategies that ignore it
        get_int(strategy, "last_keep_len", "strategy", minimum=0)
    try:
        built = strategy_from_config(strategy)
    except ValueError as error:
        raise ConfigError(f"strategy.{first_line(error)}") from None
    except Exception as error:  # not a usable strategy class (wrong arguments, not a BaseContextStrategy, ...)
        raise ConfigError(f"strategy._target_={target}: cannot build the strategy ({first_line(error)})") from None
    settings = _stream_settings(stream, seed)
    try:
        check_reply_fits(built, settings)
    except ValueError as error:
        raise ConfigError(f"stream.{first_line(error)}") from None


def _stream_settings(stream: DictConfig, seed: int) -> StreamSettings:
    known = [f.name for f in dataclasses.fields(StreamSettings) if f.name != "seed" and f.name not in STREAM_MEASUREMENTS]
    for key in stream:
        if key in STREAM_MEASUREMENTS:
            raise ConfigError(f"stream.{key}: set it in the eval group: eval.{key}")
        if key not in known:
            raise ConfigError(f"stream.{key}: unknown key; stream has: {', '.join(known)} (the seed is the top-level `seed`)")
    try:
        return StreamSettings(**OmegaConf.to_container(stream, resolve=True), seed=seed)
    except ValueError as error:
        raise ConfigError(f"stream.{first_line(error)}") from None
