from __future__ import annotations

from dataclasses import dataclass

import torch

from prospect.cache import PositionedCache, cache_length
from prospect.context_strategies.base import check_last_keep_len
from prospect.context_strategies.budget import ScoredKeep


@dataclass
class StreamingLLM(ScoredKeep):
    """`streaming_llm` (StreamingLLM, Xiao et al. 2023, "Efficient Streaming Language Models with Attention
    Sinks"): over the threshold, keep the first `sink_len` tokens of the cache (the attention sinks, instead of
    the initial cache) and the last `last_keep_len` tokens; positions are re-rotated to 0..len-1 by default.

    sink_len: first tokens kept (the paper: 4). The recent window is cut by position only, like drop_middle:
    it may start inside a frame (no whole-frame or orphan rule)."""

    sink_len: int = 4
    position_mode: str = "contiguous"

    drop_orphans = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sink_len < 0:
            raise ValueError(f"sink_len={self.sink_len}: must be >= 0")
        check_last_keep_len(self, self.sink_len, "sink_len")

    @property
    def name(self) -> str:
        return "streaming_llm"

    def prefix_len(self) -> int:
        return self.sink_len

    def score(self, cache: PositionedCache) -> torch.Tensor:
        return torch.arange(cache_length(cache), dtype=torch.float32)  # recency
