from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prospect.cache import PositionedCache, cache_length, rerotate
from prospect.context_strategies.budget import HeadScoredKeep


def window_attention(cache: PositionedCache, window: int) -> torch.Tensor:
    """Attention every cached token receives from the queries of the last `window` tokens, per layer and KV
    head ([layers, kv_heads, length]): softmax(q k^T / sqrt(d)) with the causal mask, summed over those
    queries, averaged over the query heads that share the KV head. Queries are the recorded pre-RoPE ones,
    rotated to their tokens' current positions (per head on a per-head cache)."""
    length = cache_length(cache)
    first = length - window
    positions = cache.head_records().positions[:, :, first:length]  # [layers, kv_heads, window]
    received = []
    for layer, layer_positions in zip(cache.layers, positions):
        keys = layer.keys[0].float()  # [kv_heads, length, dim]
        heads_kv, _, dim = keys.shape
        queries = layer.query_buffer[first:length].float().reshape(window, -1, dim).transpose(0, 1)  # [heads, w, dim]
        group = queries.shape[0] // heads_kv
        queries = rerotate(queries[None], layer_positions.repeat_interleave(group, dim=0), cache.inv_freq)[0]
        keys = keys.repeat_interleave(group, dim=0)
        logits = queries @ keys.transpose(1, 2) / math.sqrt(dim)  # [heads, w, length]
        visible = torch.arange(length, device=keys.device)[None, :] <= torch.arange(first, length, device=keys.device)[:, None]
        weights = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        received.append(weights.sum(dim=1).reshape(heads_kv, group, length).mean(dim=1))
    return torch.stack(received)


@dataclass
class SnapKV(HeadScoredKeep):
    """`snapkv` (SnapKV, Li et al. 2024, arXiv 2404.14469): over the threshold, keep the initial cache, the
    last `window` tokens (the observation window), and, in each layer and KV head, the tokens that receive
    the most attention there from the window's queries (summed over the queries, averaged over the query
    heads of the KV head, smoothed by a 1-D max pool of `kernel` over the tokens before the window) until
    `last_keep_len` is reached. The queries are recorded as the model computes them (no extra forward pass).

    window: observation window (<= last_keep_len, >= 1); kernel: odd max-pool width (1 = no smoothing);
    selection: per_head (the paper), per_layer or shared (scores averaged over heads, then layers)."""

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
        attention = self.group_mean(window_attention(cache, window))  # averaged within groups, then pooled
        length = attention.shape[-1]
        before = attention[..., : length - window]  # SnapKV pools the scores outside the window only
        pooled = torch.nn.functional.max_pool1d(before, self.kernel, stride=1, padding=self.kernel // 2)
        return torch.cat([pooled, attention[..., length - window :]], dim=-1)
