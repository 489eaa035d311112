from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prospect.cache import KIND, PositionedCache, cache_length
from prospect.context_strategies.budget import BudgetKeep, frame_groups


@dataclass
class SimpleStream(BudgetKeep):
    """`simple_stream` (SimpleStream, arXiv 2604.02317: a VLM that sees only the most recent frames matches or
    beats elaborate streaming-memory methods; 4 frames was its best): the model decides and speaks over the
    protected prefix (the initial cache, as every budget strategy) and its last `frames` frames only, with the
    dialogue of their span; nothing older.

    A reduction keeps the prefix, the newest `frames - 1` whole frames after it and the dialogue tokens from the
    oldest kept frame's first token on (with no frame kept: the dialogue after the newest frame); the next frame
    completes the window of `frames`. It reduces after every frame step that leaves `frames` frames after the
    prefix, and at the shared threshold like the zoo, so the model always sees the paper's recent-frames window,
    not a cache that regrows to the threshold between reductions. Equal memory: the kept tokens after the prefix
    never exceed `last_keep_len` (the newest of the span, a frame the cut splits dropped whole), so in a sweep
    over `last_keep_len` it holds at most what the others keep, usually far less.

    frames: frames in view at each step, the current one included (the paper: 4)."""

    frames: int = 4
    position_mode: str = "contiguous"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.frames < 1:
            raise ValueError(f"frames={self.frames}: must be >= 1")

    @property
    def name(self) -> str:
        return "simple_stream"

    def should_reduce(self, cache: PositionedCache) -> bool:
        """At the shared threshold, or once the cache holds `frames` frames after the prefix."""
        length = cache_length(cache)
        if self.should_reduce_cache(length):
            return True
        prefix = min(self.prefix_len(), length)
        image = cache.kinds[prefix:] == KIND["image"]
        return len(torch.unique(cache.frames[prefix:][image])) >= self.frames

    def handle_overflow(self, past_key_values: Any, last_msg, **context: Any):
        length = cache_length(past_key_values)
        prefix = min(self.prefix_len(), length)
        kept, _ = self.window(past_key_values, torch.arange(prefix, length), self.last_keep_len)
        self.keep_index(past_key_values, torch.cat([torch.arange(prefix), kept]))
        return past_key_values, last_msg

    def choose(self, cache: PositionedCache, candidates: torch.Tensor, budget: int) -> torch.Tensor:
        return self.window(cache, candidates, budget)[0]

    def window(self, cache: PositionedCache, candidates: torch.Tensor, budget: int) -> tuple[torch.Tensor, int]:
        """The slots kept among `candidates` (ascending, after the prefix), at most `budget`, and how many
        whole frames they hold."""
        frame = cache.frame_mask()[candidates]
        groups = frame_groups(cache, candidates[frame])  # whole frames, oldest first
        groups = groups[max(0, len(groups) - (self.frames - 1)) :]
        if groups:
            start = int(groups[0][0])
        else:  # no frame kept: the dialogue after the newest frame token
            start = int(candidates[frame][-1]) + 1 if bool(frame.any()) else 0
        dialogue = candidates[~frame & (candidates >= start)]
        kept = torch.sort(torch.cat([dialogue, *groups])).values
        if len(kept) > budget:  # the newest tokens of the span; a frame the cut splits goes whole
            kept = kept[len(kept) - budget :]
            cut = int(kept[0]) if len(kept) else int(candidates[-1]) + 1
            split = [group for group in groups if int(group[0]) < cut]
            groups = groups[len(split) :]
            if split:
                kept = kept[~torch.isin(kept, torch.cat(split))]
        return kept, len(groups)
