from __future__ import annotations

from dataclasses import dataclass

import torch

from prospect.cache import PositionedCache
from prospect.context_strategies.budget import TextFirstKeep, frame_groups


def evenly_in_time(times: list[float], count: int) -> list[int]:
    """Indices of `count` of the ascending `times` nearest to `count` targets spread evenly from the first
    to the last time (the last, newest, always included; each index once; ties go to the older)."""
    if count <= 0 or not times:
        return []
    first, last = times[0], times[-1]
    targets = [last] if count == 1 else [first + (last - first) * i / (count - 1) for i in range(count)]
    picked: set[int] = set()
    for target in reversed(targets):
        free = [i for i in range(len(times)) if i not in picked]
        picked.add(min(free, key=lambda i: (abs(times[i] - target), i)))
    return sorted(picked)


@dataclass
class FrameCoverage(TextFirstKeep):
    """`frame_coverage` (text first, even in time): like drop_frames, every dialogue token after the initial
    cache is kept first; then as many whole frames as fit the rest of `last_keep_len`, spread evenly in time
    (stream index) from the oldest to the newest cached frame after the initial cache, the newest always
    included, so the past is sampled rather than forgotten: frames kept at earlier reductions keep their
    share of the timeline instead of being crowded out by the many new ones."""

    @property
    def name(self) -> str:
        return "frame_coverage"

    def choose_frame_tokens(self, cache: PositionedCache, slots: torch.Tensor, budget: int) -> torch.Tensor:
        groups = frame_groups(cache, slots)
        if not groups:
            return torch.empty(0, dtype=torch.long)
        sizes = [len(group) for group in groups]
        times = [int(cache.frames[group[0]]) for group in groups]
        for count in range(min(len(groups), budget // min(sizes)), 0, -1):
            picks = evenly_in_time(times, count)
            if sum(sizes[i] for i in picks) <= budget:
                return torch.cat([groups[i] for i in picks])
        return torch.empty(0, dtype=torch.long)
