"""Where the config groups live (`conf/`) and what each group offers: the one source of the options.

Light on purpose (stdlib and omegaconf only): validation, the strategy registry and the bench read it before
anything heavy loads. A group's options are its YAML files; a strategy's file names its class (`_target_`).
"""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of a config group, sorted: its YAML files (and sub-folders' files as folder/name)."""
    folder = conf_dir / group
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


def strategy_targets(conf_dir: Path = CONF_DIR) -> dict[str, str]:
    """Each strategy option's class path (`_target_` of conf/strategy/NAME.yaml), by option name, sorted."""
    from omegaconf import OmegaConf

    targets = {}
    for name in group_options("strategy", conf_dir):
        target = OmegaConf.load(conf_dir / "strategy" / f"{name}.yaml").get("_target_")
        if not isinstance(target, str) or "." not in target:
            raise ValueError(f"{conf_dir / 'strategy' / name}.yaml: _target_ must name a class (package.module.Class)")
        targets[name] = target
    return targets
