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
from typing import Callable, Sequence

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
    conversations: Conversation | Sequence[Conversation],
    results: list[ConversationResult],
    progress: bool = False,
    on_frames: list[Callable[[dict], None] | None] | None = None,
    on_step: Callable[[int], None] | None = None,
    isolate: bool = True,
) -> list[ConversationResult]:
    """Stream one conversation through `lanes`, or each lane its own (`conversations`, one per lane: the
    conversations of a dataset as lanes); one result each, filled frame by frame.

    Step t feeds every lane the t-th fed frame of its conversation; a lane whose conversation has fewer frames
    has finished and sits the rest out (its cache untouched). Lanes streaming one conversation share its vision
    features and text; chunks of one length go through the model as one step (forward_lanes).

    After each step, each lane's record is in its `results[i].trace` and `on_frames[i](record)` is called, then
    `on_step(frame index)` once (the first lane's frame index at that step): the safe points between frames
    (whatever they raise stops every lane). A lane that raises is handled by `isolate` (see LaneFailures).

    Longer than the house's 80 lines on purpose: its body is the protocol of one frame in its order (records,
    make room, the frame chunk, replies, reductions, bookkeeping), and the order is what the bitwise
    lane = job-alone tests pin; the steps that stand alone already live in replies.py and feed.py."""
    model = lanes[0].model
    settings = lanes[0].settings
    for lane in lanes[1:]:
        if lane.model is not model or (lane.settings.frame_stride, lane.vision_batch_size) != (settings.frame_stride, lanes[0].vision_batch_size):
            raise ValueError("lanes share the model, frame_stride and vision_batch_size")
    if isinstance(conversations, Conversation):
        conversations = [conversations] * len(lanes)
    if len(conversations) != len(lanes):
        raise ValueError(f"{len(conversations)} conversations for {len(lanes)} lanes")
    on_frames = on_frames or [None] * len(lanes)
    callbacks = {id(lane): callback for lane, callback in zip(lanes, on_frames)}
    failures = LaneFailures(lanes, results, isolate)
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    shared: dict[int, list[PositionedCache]] = {}
    for lane, conversation in zip(lanes, conversations):
        if lane.static is not None:
            caches = shared.setdefault(id(lane.static), lane.static.caches())
            lane._start(conversation, caches[lane.lane])
        else:
            lane._start(conversation, model.new_cache(lane.capacity, lane.record_queries))
    started = time.perf_counter()
    distinct = list({id(c): c for c in conversations}.values())  # in order of first appearance

    def system_ids(conversation: Conversation) -> list[int]:
        system = model.chat.stream_start
        if conversation.system_prompt:
            system += model.chat.text_turn("system", conversation.system_prompt)
        return model.encode(system) if system else []

    for conversation in distinct:  # one step per conversation: a prompt that does not fit fails its own lanes only
        ids = system_ids(conversation)
        if ids:
            own = [lane for lane in lanes if lane._conversation is conversation]
            failures.together(own, lambda live: forward_lanes(live, [ids] * len(live), kind=KIND["system"]))
    failures.each(lanes, lambda lane: lane.strategy.start_stream(prompt_len=cache_length(lane.cache)))

    schedules = {id(c): frames_to_feed(c, settings.frame_stride) for c in distinct}
    compiled = lanes[0].static.compiled if lanes[0].static is not None else None  # stream.compile: the vision tower's layers too
    features = {id(c): frame_features(model, c, [frame for frame, _, _ in schedules[id(c)]], lanes[0].vision_batch_size, compiled)
                for c in distinct}
    steps = range(max(len(schedule) for schedule in schedules.values()))
    if progress:
        steps = tqdm(steps, desc=distinct[0].id if len(distinct) == 1 else f"{len(distinct)} conversations", unit="frame", leave=False)
    records: dict[int, FrameRecord] = {}
    for step in steps:
        if not failures.alive:
            break
        synchronize(device)
        frame_start = time.perf_counter()
        # what each conversation with a frame at this step feeds: (frame, turns, references, text ids, provenance)
        feeding: dict[int, tuple] = {}
        for conversation in distinct:
            schedule = schedules[id(conversation)]
            if step < len(schedule) and any(lane._conversation is conversation for lane in failures.alive):
                frame, turns, references = schedule[step]
                pieces = [(model.chat.text_turn(t.role, t.content), turn_kind(t), -1) for t in turns]
                pieces.append((model.chat.frame(model.image_tokens, frame.time), KIND["frame_text"], frame.index))
                feeding[id(conversation)] = (frame, turns, references, *model.encode_labeled(pieces))
        active = [lane for lane in failures.alive if id(lane._conversation) in feeding]
        images = {}  # (image features, vision ms per frame); a frame that cannot be read fails its conversation's lanes only
        for key in feeding:
            try:
                images[key] = next(features[key])
            except Exception as error:
                failures.fail([lane for lane in active if id(lane._conversation) == key], error)
        active = [lane for lane in active if lane in failures.alive]
        if not active:
            break
        for lane in active:
            lane._frame, lane._turns, lane._references, lane._text_ids, lane._text_provenance = feeding[id(lane._conversation)]
            records[id(lane)] = FrameRecord(conversation=lane._conversation.id, index=lane._frame.index, time=lane._frame.time,
                                            cache_before=cache_length(lane.cache), events=["frame"],
                                            reference_due=bool(lane._references))
            lane._timing = {"vision_ms": 0.0, "frame_prefill_ms": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0, "reduce_ms": 0.0}
            lane._cache_max = cache_length(lane.cache)
            for turn in lane._turns:
                if turn.role == "system" and turn.content.startswith(KNOWLEDGE_PREFIX):
                    lane._knowledge = turn.content

        def make_room(lane: Lane) -> None:
            lane._pending = lane._make_room(len(lane._pending) + len(lane._text_ids), lane._pending, records[id(lane)], lane._frame)

        summarize_lanes(failures, active, lambda lane: lane._needs_room(len(lane._pending) + len(lane._text_ids)))
        failures.each(active, make_room)
        for lane in [lane for lane in active if lane in failures.alive]:
            lane._image, lane._timing["vision_ms"] = images[id(lane._conversation)]
        # the frame chunk: one step for the lanes with nothing pending, alone for a lane with a restart text
        live = [lane for lane in active if lane in failures.alive]
        plain = [lane for lane in live if not lane._pending]
        for group in [plain] + [[lane] for lane in live if lane._pending]:
            synchronize(device)
            t0 = time.perf_counter()

            def feed(members: list[Lane]) -> None:
                chunks = [lane._pending + lane._text_ids for lane in members]
                provenances = [Provenance.concat([Provenance.of(len(lane._pending), lane._pending_kind), lane._text_provenance])
                               for lane in members]
                image = [lane._image for lane in members] if len(feeding) > 1 else members[0]._image
                forward_lanes(members, chunks, image, provenances=provenances)

            failures.together(group, feed)
            synchronize(device)
            for lane in [lane for lane in group if lane in failures.alive]:
                lane._timing["frame_prefill_ms"] = (time.perf_counter() - t0) * 1000
                lane._timing["prefill_ms"] += lane._timing["frame_prefill_ms"]
                records[id(lane)]["chunk_tokens"] = len(lane._pending) + len(lane._text_ids)
                lane._pending = []

        replies = reply_lanes(failures, active, records)

        def after_replies(lane: Lane) -> bool:
            """Record the reply, capture the initial cache; returns whether the strategy reduces now."""
            record, result = records[id(lane)], failures.results[id(lane)]
            reply_ids = replies.get(id(lane))
            if reply_ids is not None:
                reply = model.decode(reply_ids)
                result.replies[lane._frame.index] = reply
                record["reply"] = reply
                record["events"].append("speak")
            record["generated_tokens"] = len(reply_ids or [])
            if not lane._initial_captured and any(t.role == "user" for t in lane._turns):
                lane.strategy.set_initial_cache(lane.cache)
                lane._initial_captured = True
            return lane.strategy.should_reduce(lane.cache)

        reducing = failures.each(active, after_replies)
        summarize_lanes(failures, active, lambda lane: reducing[id(lane)])

        def finish_frame(lane: Lane) -> None:
            record = records[id(lane)]
            if reducing[id(lane)]:
                lane._pending = lane._reduce(lane._pending, record, lane._frame)
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

        failures.each(active, finish_frame)
        stepped = [lane for lane in active if lane in failures.alive]
        conversations_fed = len({id(lane._conversation) for lane in stepped})
        for lane in stepped:
            result = failures.results[id(lane)]
            record = records[id(lane)]
            if conversations_fed > 1:  # the step fed several conversations' frames: this frame's share of its wall time
                record["wall_ms"] /= conversations_fed
            result.trace.append(record)
            if step == len(schedules[id(lane._conversation)]) - 1:  # its conversation is done (a record the disk
                result.wall_s, result.finished = time.perf_counter() - started, True  # has no room for undoes it)
            callback = callbacks[id(lane)]
            if callback is not None:
                callback(record)
        if on_step is not None:
            on_step(records[id(active[0])]["index"])
    wall = time.perf_counter() - started
    peak = peak_memory_mb(device)
    for lane in lanes:
        result = failures.results[id(lane)]
        result.wall_s, result.peak_memory_mb = result.wall_s or wall, peak
    return results
