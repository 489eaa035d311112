from __future__ import annotations

from dataclasses import dataclass

import torch

from prospect.cache import PositionedCache
from prospect.context_strategies.budget import HeadScoredKeep, per_layer_heads


@dataclass
class KeyNorm(HeadScoredKeep):
    """`key_norm` (kvpress KnormPress; Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for
    KV Cache Compression"): over the threshold, keep the initial cache, the last `window` tokens, and, in
    each layer and KV head, the tokens whose keys there have the lowest L2 norm (RoPE does not change a
    norm) until `last_keep_len` is reached.

    window: last tokens always kept (<= last_keep_len); selection: per_head (the paper), per_layer or
    shared (norms averaged over heads, then layers)."""

    window: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.window <= self.last_keep_len:
            raise ValueError(f"window={self.window}: must be in [0, last_keep_len={self.last_keep_len}]")

    @property
    def name(self) -> str:
        return "key_norm"

    def score(self, cache: PositionedCache) -> torch.Tensor:
        return -per_layer_heads(cache, lambda keys, values: keys[0].float().norm(dim=-1))
