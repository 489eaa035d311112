"""Lanes (docs/sweeps.md, "Fused sweeps"): the jobs of a sweep that differ only in their context strategy stream one
conversation together through one model.

A lane is one job's strategy with its own cache, positions, provenance, trace and replies; the model, the
frames, each frame's vision features (computed once) and the text turns are shared. The lanes' caches are
rows of one [lanes, kv_heads, slots, head_dim] buffer per layer (prospect/models/static_forward.py),
and the chunks several lanes feed alike (a frame, the reply prompt, decode steps, closing tokens) are one
batched step; each lane's reductions, summaries and restart text touch that lane only
(prospect.stream.runner.stream_lanes). A lane that raises is recorded failed and the others go on.

Equality: every lane runs exactly the operations of its job run alone on the optimized path. With
`batch_lanes` false (the default off CUDA) a step computes the lanes one after the other, and each lane's
replies and trace are bitwise those of the job alone; batched (the default on CUDA, where the graphs replay
all lanes at once), a matrix product's rounding depends on how many lanes it holds, so results agree up to
that rounding (docs/sweeps.md, "Fused sweeps", gives the measured agreement).
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Sequence

from prospect.context_strategies import BaseContextStrategy
from prospect.data.types import Conversation
from prospect.models.static_forward import StaticForward
from prospect.models.vlm import VisionLanguageModel
from prospect.stream.frame_record import ConversationResult, FrameRecord
from prospect.stream.frame_loop import stream_lanes
from prospect.stream.runner import StreamRunner
from prospect.stream.settings import GPU_SHARE_ENV, StreamSettings


class LaneRunner:
    """Streams conversations through one model under several context strategies at once, one lane each."""

    def __init__(
        self,
        model: VisionLanguageModel,
        strategies: Sequence[BaseContextStrategy],
        settings: StreamSettings | None = None,
        batch_lanes: bool | None = None,
    ):
        if not strategies:
            raise ValueError("LaneRunner needs at least one strategy")
        settings = settings or StreamSettings()
        if settings.optimized is False:
            raise ValueError("optimized=false: lanes run the optimized (static) step; run the jobs alone for the eager one")
        capacities = [strategy.capacity(model.max_positions) for strategy in strategies]
        record = any(strategy.records_queries for strategy in strategies)
        self.model = model
        compile = model.device.type == "cuda" if settings.compile == "auto" else bool(settings.compile)
        self.static = StaticForward(model, capacities, record_queries=record, batch_lanes=batch_lanes, compile=compile)
        self.lanes = [StreamRunner(model, strategy, settings, static=self.static, lane=i) for i, strategy in enumerate(strategies)]

    def run(
        self,
        conversation: Conversation | Sequence[Conversation],
        results: list[ConversationResult] | None = None,
        progress: bool = False,
        on_frames: list[Callable[[dict], None] | None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> list[ConversationResult]:
        """Stream one conversation through every lane, or a list of them, one per lane (conversations as
        lanes; a shorter list runs the first lanes only); one result per lane (pass `results` to keep partial output if this raises).
        `on_frames[i](record)` follows each of lane i's frames, `on_step(frame index)` each step of all lanes:
        the safe points (what they raise stops every lane)."""
        per_lane = [conversation] * len(self.lanes) if isinstance(conversation, Conversation) else list(conversation)
        if len(per_lane) > len(self.lanes):
            raise ValueError(f"{len(per_lane)} conversations for {len(self.lanes)} lanes")
        results = results if results is not None else [ConversationResult(c) for c in per_lane]
        # fewer conversations than lanes (a dataset's last batch): the first lanes run, the others stay idle
        return stream_lanes(self.lanes[: len(per_lane)], per_lane, results, progress, on_frames, on_step, isolate=True)


MAX_CONVERSATION_BATCH = 16  # conversation_batch=auto streams at most this many conversations at once


def conversation_batch(requested: int | str, model: VisionLanguageModel, strategies: Sequence[BaseContextStrategy],
                       conversations: int, optimized: bool) -> int:
    """How many conversations a job (or a fused lane set of `strategies`) streams at once as lanes: an integer
    is taken as it is (at most `conversations`); auto is 1 off CUDA or off the optimized step, else as many
    as the GPU's free memory holds beside what is loaded (its share of it where the gpu_pool launcher runs
    several jobs on one GPU: GPU_SHARE_ENV), each conversation costing one lane per strategy at the largest
    capacity (prospect.models.footprint.lane_bytes), at most MAX_CONVERSATION_BATCH."""
    if requested != "auto":
        return max(1, min(int(requested), conversations))
    if model.device.type != "cuda" or not optimized or conversations <= 1:
        return 1
    import torch

    from prospect.models.footprint import RESERVE_BYTES, lane_bytes

    capacity = max(strategy.capacity(model.max_positions) for strategy in strategies)
    records = any(strategy.records_queries for strategy in strategies)
    per_conversation = len(strategies) * lane_bytes(model.model.config.text_config, model.dtype.itemsize, capacity, records)
    free, _ = torch.cuda.mem_get_info(model.device)
    try:
        share = max(1, int(os.environ.get(GPU_SHARE_ENV, "1")))
    except ValueError:
        share = 1
    return batch_that_fits(free, per_conversation, conversations, share, RESERVE_BYTES)


def batch_that_fits(free_bytes: int, per_conversation_bytes: int, conversations: int, share: int = 1, reserve_bytes: int = 0) -> int:
    """The conversations of `per_conversation_bytes` each that fit in `free_bytes / share` less `reserve_bytes`:
    at least 1, at most MAX_CONVERSATION_BATCH and `conversations`."""
    fit = (free_bytes // share - reserve_bytes) // per_conversation_bytes if per_conversation_bytes > 0 else conversations
    return int(max(1, min(fit, MAX_CONVERSATION_BATCH, conversations)))


class OneLane:
    """A runner of one job (StreamRunner, the oracle, or a seed-style runner with `run(conversation, result,
    progress[, on_frame])`) behind LaneRunner's interface, as its one lane: the run path treats a single job as
    the one-lane case. Unlike LaneRunner's lanes, an error propagates (the caller records the conversation
    failed). A runner whose run() takes no `on_frame` hands over its frames' records after the conversation."""

    def __init__(self, runner: Any):
        self.runner = runner
        self.model = getattr(runner, "model", None)
        try:
            self.per_frame = "on_frame" in inspect.signature(runner.run).parameters
        except (TypeError, ValueError):
            self.per_frame = False

    def run(self, conversation: Conversation, results: list[ConversationResult] | None = None, progress: bool = False,
            on_frames: list | None = None, on_step: Callable[[int], None] | None = None) -> list[ConversationResult]:
        """As LaneRunner.run, for the one lane."""
        result = results[0] if results else ConversationResult(conversation)
        on_frame = on_frames[0] if on_frames else None
        if not self.per_frame:
            try:
                self.runner.run(conversation, result, progress=progress)
            finally:  # what it made, also when it raised
                for record in result.trace if on_frame is not None else ():
                    on_frame(record)
            return [result]

        def each_frame(record: FrameRecord) -> None:  # the safe point between frames
            if on_frame is not None:
                on_frame(record)
            if on_step is not None:
                on_step(record["index"])

        self.runner.run(conversation, result, progress=progress, on_frame=each_frame)
        return [result]
