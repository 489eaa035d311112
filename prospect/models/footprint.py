"""What a model config costs in memory, known from its architecture alone: nothing is loaded.

`model_footprint` gives the text config (layers, KV heads, head size, hidden and MLP sizes, vocabulary, max
positions: what KV bytes per token and activations follow from) and the parameter count (weight bytes at a
dtype's size), from the architecture (conf/model's `architecture`) or the local/hub config, instantiated on
the meta device. `lane_bytes` is what one lane holds on the GPU: the fused launcher sizes its lane sets with
them (prospect.sweep.lane_memory), a job its conversation batch (prospect.stream.lanes.conversation_batch).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prospect.models.architectures import ARCHITECTURES, OFFLINE_VISION, smolvlm_config

GIB = 2**30
RESERVE_BYTES = GIB  # CUDA graph pools, allocator fragmentation, the vision tower's activations
ACTIVATION_TOKENS = 1024  # the longest chunk a lane feeds at once (system prompt and knowledge, a summary's restart)


def model_footprint(model_cfg: dict) -> tuple[Any, int]:
    """(text config, parameter count) of a model config, from its architecture (or its local/hub config)
    instantiated on the meta device: nothing is loaded."""
    import torch  # lazy, as transformers: the sweep launcher imports this module for the lane arithmetic below
    from transformers import AutoConfig, SmolVLMForConditionalGeneration

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


def kv_bytes_per_lane(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, capacity: int) -> int:
    """One lane's rows of the static KV buffers: keys and values of every layer, over the buffer's slots
    (capacity and scratch slot, aligned: prospect.models.static_forward.buffer_slots)."""
    from prospect.models.static_forward import buffer_slots  # lazy, as every torch module here: the launcher loads no torch

    return 2 * layers * kv_heads * head_dim * dtype_bytes * buffer_slots(capacity)


def query_bytes_per_lane(layers: int, heads: int, head_dim: int, dtype_bytes: int, capacity: int) -> int:
    """One lane's rows of the query buffers, kept when a lane's strategy scores keys by queries (snapkv)."""
    from prospect.models.static_forward import buffer_slots  # lazy: torch

    return layers * heads * head_dim * dtype_bytes * buffer_slots(capacity)


def activation_bytes_per_lane(hidden: int, ffn: int, vocab: int, dtype_bytes: int, tokens: int = ACTIVATION_TOKENS) -> int:
    """A margin for one lane's activations in its largest step: float32 logits over the vocabulary and a
    few hidden/MLP-sized tensors per token."""
    return tokens * (vocab * 4 + 4 * (hidden + ffn) * dtype_bytes)


def lane_bytes(text: Any, dtype_bytes: int, capacity: int, records_queries: bool = False) -> int:
    """What one lane of `capacity` tokens holds on the GPU for a model of text config `text`: its KV rows,
    its query rows when a strategy keeps them, and an activation margin."""
    size = kv_bytes_per_lane(text.num_hidden_layers, text.num_key_value_heads, text.head_dim, dtype_bytes, capacity)
    if records_queries:
        size += query_bytes_per_lane(text.num_hidden_layers, text.num_attention_heads, text.head_dim, dtype_bytes, capacity)
    return size + activation_bytes_per_lane(text.hidden_size, text.intermediate_size, text.vocab_size, dtype_bytes)
