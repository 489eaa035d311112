"""What a model config costs in memory, known from its architecture alone: nothing is loaded.

`model_footprint` gives the text config (layers, KV heads, head size, hidden and MLP sizes, vocabulary, max
positions: what KV bytes per token and activations follow from) and the parameter count (weight bytes at a
dtype's size), from the architecture (conf/model's `architecture`) or the local/hub config, instantiated on
the meta device. The fused launcher sizes its lane sets with it (prospect.sweep.lane_memory).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, SmolVLMForConditionalGeneration

from prospect.models.architectures import ARCHITECTURES, OFFLINE_VISION, smolvlm_config


def model_footprint(model_cfg: dict) -> tuple[Any, int]:
    """(text config, parameter count) of a model config, from its architecture (or its local/hub config)
    instantiated on the meta device: nothing is loaded."""
    if model_cfg.get("architecture"):
        arch = ARCHITECTURES[model_cfg["architecture"]]
        if model_cfg.get("gguf_file"):
            arch = dataclasses.replace(arch, **OFFLINE_VISION)
        config = smolvlm_config(arch)
    else:
        config = AutoConfig.from_pretrained(str(Path(model_cfg["path"]).expanduser()) if model_cfg.get("path") else model_cfg["hub_id"])
    with torch.device("meta"):
        model = SmolVLMForConditionalGeneration(config)
    return config.text_config, sum(p.numel() for p in model.parameters())
