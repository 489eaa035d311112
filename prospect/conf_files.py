"""Where the config groups live (`conf/`) and what each group offers: the one source of the options.

Light on purpose (stdlib and omegaconf only): validation, the strategy registry and the bench read it before
anything heavy loads. A group's options are its YAML files; a strategy's file names its class (`_target_`).
A user's own config folders (`hydra.searchpath=[file:///their/conf]`) add their YAML files to the options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def search_dirs(search_path: Iterable[str]) -> list[Path]:
    """The folders of Hydra search-path entries (`file:///a` or `/a`); other sources (`pkg://`) are left out."""
    folders = []
    for entry in search_path:
        scheme, sep, rest = str(entry).partition("://")
        if not sep:
            folders.append(Path(scheme))
        elif scheme == "file":
            folders.append(Path(rest))
    return folders


def group_options(group: str, conf_dir: Path = CONF_DIR, search_path: Iterable[str] = ()) -> list[str]:
    """The options of a config group, sorted: its YAML files (and sub-folders' files as folder/name), in conf_dir
    and in the folders of the search path."""
    options = set()
    for root in (conf_dir, *search_dirs(search_path)):
        folder = root / group
        if folder.is_dir():
            options.update(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))
    return sorted(options)


def strategy_targets(conf_dir: Path = CONF_DIR) -> dict[str, str]:
    """Each strategy option's class path (`_target_` of conf/strategy/NAME.yaml), by option name, sorted."""
    targets = {}
    for name in group_options("strategy", conf_dir):
        target = OmegaConf.load(conf_dir / "strategy" / f"{name}.yaml").get("_target_")
        if not isinstance(target, str) or "." not in target:
            raise ValueError(f"{conf_dir / 'strategy' / name}.yaml: _target_ must name a class (package.module.Class)")
        targets[name] = target
    return targets
