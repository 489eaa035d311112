from __future__ import annotations

from dataclasses import dataclass

import torch

from prospect.cache import PositionedCache
from prospect.context_strategies.budget import TextFirstKeep, frame_groups


def evenly_spaced(count: int, total: int) -> list[int]:
    """`count` distinct indices of 0..total-1 spread evenly, the last (newest) always included."""
    if count <= 0:
        return []
    if count == 1:
        return [total - 1]
    return sorted({int((total - 1) * i / (count - 1) + 0.5) for i in range(count)})


@dataclass
class FrameCoverage(TextFirstKeep):
    """`frame_coverage` (text first, even in time): like drop_frames, every dialogue token after the initial
    cache is kept first; then as many whole frames as fit the rest of `last_keep_len`, spread evenly over
    the frames being thinned (oldest to newest, the newest always included), so the past is sampled rather
    than forgotten."""

    @property
    def name(self) -> str:
        return "frame_coverage"

    def choose_frame_tokens(self, cache: PositionedCache, slots: torch.Tensor, budget: int) -> torch.Tensor:
        groups = frame_groups(cache, slots)
        if not groups:
            return torch.empty(0, dtype=torch.long)
        sizes = [len(group) for group in groups]
        for count in range(min(len(groups), budget // min(sizes)), 0, -1):
            picks = evenly_spaced(count, len(groups))
            if sum(sizes[i] for i in picks) <= budget:
                return torch.cat([groups[i] for i in picks])
        return torch.empty(0, dtype=torch.long)
