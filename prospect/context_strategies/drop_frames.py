from __future__ import annotations

from dataclasses import dataclass

import torch

from prospect.cache import PositionedCache
from prospect.context_strategies.budget import TextFirstKeep, frame_groups


@dataclass
class DropFrames(TextFirstKeep):
    """`drop_frames` (text first, recency): over the threshold, keep the initial cache and every dialogue
    token after it (the newest if they alone exceed `last_keep_len`), then fill the rest of the budget with
    the most recent frames, whole (image and frame_text tokens together), newest first, stopping at the first
    frame that does not fit."""

    @property
    def name(self) -> str:
        return "drop_frames"

    def choose_frame_tokens(self, cache: PositionedCache, slots: torch.Tensor, budget: int) -> torch.Tensor:
        kept, used = [], 0
        for group in reversed(frame_groups(cache, slots)):
            if used + len(group) > budget:
                break
            kept.append(group)
            used += len(group)
        return torch.cat(kept) if kept else torch.empty(0, dtype=torch.long)
