"""Checks of the `logger` config group (conf/logger/*.yaml): one line naming the key and what is allowed."""

from __future__ import annotations

from typing import Iterable

from omegaconf import DictConfig, ListConfig

from prospect.conf_files import group_options
from prospect.config_values import ConfigError, get_choice, get_value

WANDB_MODES = ("online", "offline", "disabled", "shared")


def check_logger(logger: DictConfig, search_path: Iterable[str] = ()) -> None:
    """The logger is one of the group's options (search_path: a user's config folders); W&B's mode and tags."""
    name = get_choice(logger, "name", "logger", group_options("logger", search_path=search_path))
    if name == "wandb":
        get_choice(logger, "mode", "logger", (None,) + WANDB_MODES)
        tags = get_value(logger, "tags", "logger")
        if not isinstance(tags, (ListConfig, list)):
            raise ConfigError(f"logger.tags={tags}: must be a list")
