from __future__ import annotations

from dataclasses import dataclass

import torch

from prospect.cache import PositionedCache
from prospect.context_strategies.budget import ScoredKeep, mean_over_layers


@dataclass
class KeyNorm(ScoredKeep):
    """`key_norm` (kvpress KnormPress; Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for
    KV Cache Compression"): over the threshold, keep the initial cache, the last `window` tokens, and the
    tokens whose keys have the lowest L2 norm (mean over layers and heads; RoPE does not change a norm)
    until `last_keep_len` is reached.

    window: last tokens always kept (<= last_keep_len)."""

    window: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.window <= self.last_keep_len:
            raise ValueError(f"window={self.window}: must be in [0, last_keep_len={self.last_keep_len}]")

    @property
    def name(self) -> str:
        return "key_norm"

    def score(self, cache: PositionedCache) -> torch.Tensor:
        return -mean_over_layers(cache, lambda keys, values: keys[0].float().norm(dim=-1).mean(dim=0))
