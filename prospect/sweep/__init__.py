"""Sweeps: the result cache (job key), end-of-sweep aggregation (`prospect.report`), launchers."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

from prospect.conf_files import CONF_DIR
from prospect.config_values import ConfigError


JOB_FOLDER_BYTES = 200  # a folder name may have 255 bytes on most file systems; room for a suffix


def job_folder(number: object, overrides: object) -> str:
    """A sweep job's folder name (hydra.sweep.subdir): `N_OVERRIDES`, or, when that is longer than JOB_FOLDER_BYTES,
    its start and a hash of the whole `N_START..._HASH` (the job's overrides are in its .hydra/overrides.yaml)."""
    name = f"{number}_{overrides}" if overrides not in (None, "") else str(number)
    if len(name.encode()) <= JOB_FOLDER_BYTES:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    start = name.encode()[: JOB_FOLDER_BYTES - len(digest) - 4].decode(errors="ignore")
    return f"{start}..._{digest}"


if not OmegaConf.has_resolver("prospect.job_folder"):  # conf/config.yaml's hydra.sweep.subdir
    OmegaConf.register_new_resolver("prospect.job_folder", job_folder)


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
