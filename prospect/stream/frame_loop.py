"""The frame loop over lanes.

---- the frame loop over lanes ---------------------------------------------------------------------
One job is one lane. Several lanes (jobs of a sweep that differ only in their strategy, see
prospect.stream.lanes) stream the same conversation together: the frames, their vision features and the
text turns are shared; each lane has its own strategy, cache, positions, provenance, trace and replies.
Chunks that are the same for several lanes (a frame, the reply prompt, decode steps, closing tokens) go
through the model as one step (StaticForward.forward_lanes); reductions, summaries and a summary's restart
text touch their lane only. Every lane runs exactly the operations it runs alone, in the same order.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from tqdm import tqdm

from prospect.cache import KIND, PositionedCache, Provenance, cache_length
from prospect.context_strategies.base import ContextOverflowError
from prospect.data.types import Conversation
from prospect.stream.feed import (KNOWLEDGE_PREFIX, Lane, LaneFailures, forward_lanes, frame_features, frames_to_feed,
                                  peak_memory_mb, synchronize, turn_kind)
from prospect.stream.frame_record import ConversationResult, FrameRecord
from prospect.stream.replies import reply_lanes
from prospect.stream.summaries import summarize_lanes

log = logging.getLogger(__name__)


def stream_lanes(
    lanes: list[Lane],
    conversation: Conversation,
    results: list[ConversationResult],
    progress: bool = False,
    on_frames: list[Callable[[dict], None] | None] | None = None,
    on_step: Callable[[int], None] | None = None,
    isolate: bool = True,
) -> list[ConversationResult]:
    """Stream one conversation through `lanes` (one result each, filled frame by frame).

    After each frame, lane i's record is in `results[i].trace` and `on_frames[i](record)` is called, then
    `on_step(frame index)` once: the safe points between frames (whatever they raise stops every lane). A lane that
    raises is handled by `isolate` (see LaneFailures).

    Longer than the house's 80 lines on purpose: its body is the protocol of one frame in its order (records,
    make room, the frame chunk, replies, reductions, bookkeeping), and the order is what the bitwise
    lane = job-alone tests pin; the steps that stand alone already live in replies.py and feed.py."""
    model = lanes[0].model
    settings = lanes[0].settings
    for lane in lanes[1:]:
        if lane.model is not model or (lane.settings.frame_stride, lane.vision_batch_size) != (settings.frame_stride, lanes[0].vision_batch_size):
            raise ValueError("lanes share the model, frame_stride and vision_batch_size")
    on_frames = on_frames or [None] * len(lanes)
    callbacks = {id(lane): callback for lane, callback in zip(lanes, on_frames)}
    failures = LaneFailures(lanes, results, isolate)
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    shared: dict[int, list[PositionedCache]] = {}
    for lane in lanes:
        if lane.static is not None:
            caches = shared.setdefault(id(lane.static), lane.static.caches())
            lane._start(conversation, caches[lane.lane])
        else:
            lane._start(conversation, model.new_cache(lane.capacity, lane.record_queries))
    started = time.perf_counter()

    system = model.chat.stream_start
    if conversation.system_prompt:
        system += model.chat.text_turn("system", conversation.system_prompt)
    if system:
        ids = model.encode(system)
        failures.together(lanes, lambda live: forward_lanes(live, [ids] * len(live), kind=KIND["system"]))
    failures.each(lanes, lambda lane: lane.strategy.start_stream(prompt_len=cache_length(lane.cache)))

    schedule = frames_to_feed(conversation, settings.frame_stride)
    features = frame_features(model, conversation, [frame for frame, _, _ in schedule], lanes[0].vision_batch_size)
    iterator = schedule
    if progress:
        iterator = tqdm(schedule, desc=conversation.id, unit="frame", leave=False)
    records: dict[int, FrameRecord] = {}
    for frame, turns, references in iterator:
        if not failures.alive:
            break
        synchronize(device)
        frame_start = time.perf_counter()
        for lane in failures.alive:
            records[id(lane)] = FrameRecord(conversation=conversation.id, index=frame.index, time=frame.time,
                                            cache_before=cache_length(lane.cache), events=["frame"],
                                            reference_due=bool(references))
            lane._timing = {"vision_ms": 0.0, "frame_prefill_ms": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0, "reduce_ms": 0.0}
            lane._cache_max = cache_length(lane.cache)
            for turn in turns:
                if turn.role == "system" and turn.content.startswith(KNOWLEDGE_PREFIX):
                    lane._knowledge = turn.content
        pieces = [(model.chat.text_turn(t.role, t.content), turn_kind(t), -1) for t in turns]
        pieces.append((model.chat.frame(model.image_tokens, frame.time), KIND["frame_text"], frame.index))
        text_ids, text_provenance = model.encode_labeled(pieces)

        def make_room(lane: Lane) -> None:
            lane._pending = lane._make_room(len(lane._pending) + len(text_ids), lane._pending, records[id(lane)], frame)

        summarize_lanes(failures, lanes, lambda lane: lane._needs_room(len(lane._pending) + len(text_ids)))
        failures.each(lanes, make_room)
        image, vision_ms = next(features)
        for lane in failures.alive:
            lane._timing["vision_ms"] = vision_ms
        # the frame chunk: one step for the lanes with nothing pending, alone for a lane with a restart text
        plain = [lane for lane in failures.alive if not lane._pending]
        for group in [plain] + [[lane] for lane in failures.alive if lane._pending]:
            synchronize(device)
            t0 = time.perf_counter()

            def feed(live: list[Lane]) -> None:
                chunks = [lane._pending + text_ids for lane in live]
                provenances = [Provenance.concat([Provenance.of(len(lane._pending), lane._pending_kind), text_provenance]) for lane in live]
                forward_lanes(live, chunks, image, provenances=provenances)

            failures.together(group, feed)
            synchronize(device)
            for lane in [lane for lane in group if lane in failures.alive]:
                lane._timing["frame_prefill_ms"] = (time.perf_counter() - t0) * 1000
                lane._timing["prefill_ms"] += lane._timing["frame_prefill_ms"]
                records[id(lane)]["chunk_tokens"] = len(lane._pending) + len(text_ids)
                lane._pending = []

        speak = bool(references) if settings.talk_policy == "gt_turns" else None
        replies = reply_lanes(failures, speak, records, frame, references)

        def after_replies(lane: Lane) -> bool:
            """Record the reply, capture the initial cache; returns whether the strategy reduces now."""
            record, result = records[id(lane)], failures.results[id(lane)]
            reply_ids = replies.get(id(lane))
            if reply_ids is not None:
                reply = model.decode(reply_ids)
                result.replies[frame.index] = reply
                record["reply"] = reply
                record["events"].append("speak")
            record["generated_tokens"] = len(reply_ids or [])
            if not lane._initial_captured and any(t.role == "user" for t in turns):
                lane.strategy.set_initial_cache(lane.cache)
                lane._initial_captured = True
            return lane.strategy.should_reduce(lane.cache)

        reducing = failures.each(lanes, after_replies)
        summarize_lanes(failures, lanes, lambda lane: reducing[id(lane)])

        def finish_frame(lane: Lane) -> None:
            record = records[id(lane)]
            if reducing[id(lane)]:
                lane._pending = lane._reduce(lane._pending, record, frame)
            synchronize(device)
            record.update(lane._timing)
            record["cache_after"] = cache_length(lane.cache)
            if lane.cache.per_head:  # the mean over (layer, KV head), and the range it spans
                per_head = lane.cache.frame_tokens_per_head()
                record["cache_frame_tokens"] = float(per_head.float().mean())
                record["cache_frame_tokens_range"] = [int(per_head.min()), int(per_head.max())]
            else:
                record["cache_frame_tokens"] = lane.cache.frame_tokens()
            record["cache_dialogue_tokens"] = record["cache_after"] - record["cache_frame_tokens"]
            record["cache_max"] = lane._cache_max  # the most tokens held during this frame step
            record["next_position"] = lane.cache.next_position
            record["pending_tokens"] = len(lane._pending)
            record["wall_ms"] = (time.perf_counter() - frame_start) * 1000
            if cache_length(lane.cache) > lane.capacity:  # the invariant; a bug if it ever fires
                raise ContextOverflowError(f"cache holds {cache_length(lane.cache)} tokens > capacity {lane.capacity}")

        failures.each(lanes, finish_frame)
        for lane in list(failures.alive):
            failures.results[id(lane)].trace.append(records[id(lane)])
            callback = callbacks[id(lane)]
            if callback is not None:
                callback(records[id(lane)])
        if on_step is not None:
            on_step(frame.index)
    wall = time.perf_counter() - started
    peak = peak_memory_mb(device)
    for lane in lanes:
        result = failures.results[id(lane)]
        result.wall_s, result.peak_memory_mb = wall, peak
    return results
