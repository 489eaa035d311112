from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from prospect.cache import PositionedCache, cache_length
from prospect.context_strategies.budget import BudgetKeep, frame_groups


@dataclass
class StreamingVLM(BudgetKeep):
    """`streaming_vlm` (StreamingVLM, arXiv 2510.09608, mit-han-lab/streaming-vlm): split budgets. Over the
    shared threshold it keeps the protected prefix (the initial cache, as every budget strategy: it holds the
    system prompt of the paper's sink), then after it the first `text_sink` dialogue tokens (the text sink), the
    last `text_window` dialogue tokens (the recent text) and the whole frames of the last `vision_seconds`
    seconds, newest first, in what `last_keep_len` leaves: text first, so the kept tokens after the prefix never
    exceed `last_keep_len` (equal memory with the zoo). Every other token is evicted, also when all would fit in
    `last_keep_len` (the windows are the method); kept keys are re-rotated to contiguous positions by default, as
    in the paper.

    The vision window is measured in stream time: frame k is at (k + 1) / fps seconds (docs/data.md), and the
    reduction's context gives the current frame's index and time, so fps = (frame_index + 1) / time, and frame k
    is in the window when frame_index - k < vision_seconds * fps (the current frame and those of the seconds
    before it). Called without that context (a direct call), the window is the budget's only limit.

    text_sink, text_window: dialogue tokens (the paper: 512 each; here 16 each, so that at
    the smallest budget a preset sweeps, last_keep_len 128, the text takes a quarter and a frame of the 256M/500M
    models still fits); their sum must not exceed last_keep_len. vision_seconds: seconds of frames (the paper:
    16; inf: no time limit, `strategy.vision_seconds=inf` on the command line)."""

    text_sink: int = 16
    text_window: int = 16
    vision_seconds: float = 16.0
    position_mode: str = "contiguous"

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("text_sink", "text_window"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)}: must be >= 0")
        if not self.vision_seconds > 0:
            raise ValueError(f"vision_seconds={self.vision_seconds}: must be > 0")
        text = self.text_sink + self.text_window
        if text > self.last_keep_len:
            raise ValueError(f"text_window={self.text_window}: text_sink + text_window ({text}) must be <= last_keep_len ({self.last_keep_len})")

    @property
    def name(self) -> str:
        return "streaming_vlm"

    def first_frame_in_view(self, frame_index: int | None, time: float | None) -> int | None:
        """The oldest stream index in the vision window at the current frame (`frame_index`, at `time` seconds),
        or None without a limit."""
        if frame_index is None or time is None or time <= 0 or math.isinf(self.vision_seconds):
            return None
        span = self.vision_seconds * (frame_index + 1) / time  # the window in frames; the tolerance absorbs rounding
        return frame_index + 1 - math.ceil(span - 1e-6)

    def handle_overflow(self, past_key_values: Any, last_msg, **context: Any):
        length = cache_length(past_key_values)
        prefix = min(self.prefix_len(), length)
        first = self.first_frame_in_view(context.get("frame_index"), context.get("time"))
        kept = self.choose(past_key_values, torch.arange(prefix, length), self.last_keep_len, first)
        self.keep_index(past_key_values, torch.cat([torch.arange(prefix), kept]))
        return past_key_values, last_msg

    def choose(self, cache: PositionedCache, candidates: torch.Tensor, budget: int, first_frame: int | None = None) -> torch.Tensor:
        frame = cache.frame_mask()[candidates]
        dialogue = candidates[~frame]
        sink, rest = dialogue[: self.text_sink], dialogue[self.text_sink :]
        text = torch.cat([sink, rest[max(0, len(rest) - self.text_window) :]])
        room = budget - len(text)
        vision = []
        for group in reversed(frame_groups(cache, candidates[frame])):  # whole frames, newest first
            if (first_frame is not None and int(cache.frames[group[0]]) < first_frame) or len(group) > room:
                break
            vision.append(group)
            room -= len(group)
        return torch.sort(torch.cat([text, *vision])).values
