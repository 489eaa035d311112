"""Sweeps: the result cache (job key), end-of-sweep aggregation (`prospect.report`), launchers."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

from prospect.conf_files import CONF_DIR
from prospect.config_values import ConfigError


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group every job of one sweep shares: the sweep folder's last two parts (date_time)."""
    path = Path(sweep_dir)
    return f"{path.parent.name}_{path.name}" if path.parent.name else path.name


PLUGIN_PREFIX = "hydra_plugins.prospect_"  # a launcher YAML's _target_ hydra_plugins.prospect_NAME.Class is prospect.sweep.NAME


def register_launchers(conf_dir: Path | None = None) -> list[str]:
    """Register with Hydra every launcher of prospect's own that conf/hydra/launcher/*.yaml names: a `_target_`
    hydra_plugins.prospect_NAME.Class is served by the module prospect.sweep.NAME, whose `register()` files the
    class under that name. Returns the modules registered. Launchers of other packages (submitit) are Hydra
    plugins already."""
    folder = (conf_dir or CONF_DIR) / "hydra" / "launcher"
    registered = []
    for path in sorted(folder.glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if isinstance(target, str) and target.startswith(PLUGIN_PREFIX):
            name = target[len(PLUGIN_PREFIX):].partition(".")[0]
            module = f"prospect.sweep.{name}"
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"{path}: _target_={target}: no launcher module {module} serves it")
            importlib.import_module(module).register()
            registered.append(f"prospect.sweep.{name}")
    return registered
