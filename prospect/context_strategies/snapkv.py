from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prospect.cache import PositionedCache, cache_length, rerotate
from prospect.context_strategies.budget import ScoredKeep


def window_attention(cache: PositionedCache, window: int) -> torch.Tensor:
    """Attention every cached token receives from the queries of the last `window` tokens ([length]):
    softmax(q k^T / sqrt(d)) with the causal mask, summed over those queries, averaged over heads and
    layers. Queries are the recorded pre-RoPE ones, rotated to their tokens' current positions."""
    length = cache_length(cache)
    first = length - window
    total = None
    for layer in cache.layers:
        keys = layer.keys[0].float()  # [kv_heads, length, dim]
        heads_kv, _, dim = keys.shape
        queries = layer.query_buffer[first:length].float().reshape(window, -1, dim).transpose(0, 1)  # [heads, w, dim]
        queries = rerotate(queries[None], cache.positions[first:length], cache.inv_freq)[0]
        keys = keys.repeat_interleave(queries.shape[0] // heads_kv, dim=0)
        logits = queries @ keys.transpose(1, 2) / math.sqrt(dim)  # [heads, w, length]
        visible = torch.arange(length, device=keys.device)[None, :] <= torch.arange(first, length, device=keys.device)[:, None]
        weights = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        received = weights.sum(dim=1).mean(dim=0)
        total = received if total is None else total + received
    return total / len(cache.layers)


@dataclass
class SnapKV(ScoredKeep):
    """`snapkv` (SnapKV, Li et al. 2024, arXiv 2404.14469): over the threshold, keep the initial cache, the
    last `window` tokens (the observation window), and the tokens that receive the most attention from the
    window's queries (summed over the queries, averaged over heads and layers, smoothed by a 1-D max pool of
    `kernel` over the tokens before the window) until `last_keep_len` is reached. The queries are recorded as
    the model computes them (no extra forward pass). window=1 with kernel=1 scores by the last token's
    attention alone: TOVA's criterion (Oren et al. 2024).

    window: observation window (<= last_keep_len, >= 1); kernel: odd max-pool width (1 = no smoothing)."""

    window: int = 32
    kernel: int = 7

    records_queries = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.window <= self.last_keep_len:
            raise ValueError(f"window={self.window}: must be in [1, last_keep_len={self.last_keep_len}]")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel={self.kernel}: must be an odd integer >= 1")

    @property
    def name(self) -> str:
        return "snapkv"

    def score(self, cache: PositionedCache) -> torch.Tensor:
        window = min(self.window, cache_length(cache))
        attention = window_attention(cache, window)
        before = attention[: len(attention) - window]  # SnapKV pools the scores outside the window only
        pooled = torch.nn.functional.max_pool1d(before[None, None], self.kernel, stride=1, padding=self.kernel // 2)[0, 0]
        return torch.cat([pooled, attention[len(attention) - window :]])
