from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prospect.cache import PositionedCache, cache_length
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

    frames: frames in view at each step, the current one included (the paper: 4). The runner checks
    `should_reduce_cache` once per frame step, after the frame and its reply, with the cache length only: the
    length grows between two checks exactly when a frame came in, so the check counts frames; every reduction
    recounts them from the cache's records (and remembers when a reduction inside a step already counted that
    step's frame)."""

    frames: int = 4
    position_mode: str = "contiguous"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.frames < 1:
            raise ValueError(f"frames={self.frames}: must be >= 1")
        self._look(0, 0)

    @property
    def name(self) -> str:
        return "simple_stream"

    def _look(self, length: int, frames: int, step_counted: bool = False) -> None:
        """What the strategy last saw: the cache length, the frames after the prefix, whether this frame step's
        frame is among them already (a reduction inside the step recounted it)."""
        self._seen_length, self._frames_after_prefix, self._step_counted = length, frames, step_counted

    def start_stream(self, prompt_len: int) -> None:
        super().start_stream(prompt_len)
        self._look(prompt_len, 0)

    def set_initial_cache(self, cache: PositionedCache) -> None:
        super().set_initial_cache(cache)
        self._look(cache_length(cache), 0)  # the prefix now holds every frame so far

    def should_reduce_cache(self, current_seq_len: int) -> bool:
        came_in = current_seq_len != self._seen_length and not self._step_counted
        self._look(current_seq_len, self._frames_after_prefix + int(came_in))
        return current_seq_len >= self.ctxlen_to_reduce or self._frames_after_prefix >= self.frames

    def handle_overflow(self, past_key_values: Any, last_msg, **context: Any):
        length = cache_length(past_key_values)
        inside_step = length != self._seen_length  # tokens came in since the last check: this step's frame
        prefix = min(self.prefix_len(), length)
        kept, frames = self.window(past_key_values, torch.arange(prefix, length), self.last_keep_len)
        self.keep_index(past_key_values, torch.cat([torch.arange(prefix), kept]))
        self._look(cache_length(past_key_values), frames, inside_step)
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
