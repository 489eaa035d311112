"""Summaries of several lanes as one batch.

A summarizing strategy (summarize_and_drop) decodes a summary inside its reduction. Lanes whose reductions
fall at the same point of a frame (several summarize_and_drop lanes of a fused sweep usually do) would decode
them one after the other, each a full chain of decode steps. `summarize_lanes` decodes them together first:
each lane feeds its summary prompt and decodes its summary (greedy on the device, the lanes still speaking
as one step, each bounded by the room its own cache leaves), exactly as its reduction would; the reduction
then takes the summary ready (StreamRunner._summarize). A lane's operations and their order are those of
its job alone, so lane = alone holds bitwise on CPU (tests/test_lanes.py).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from prospect.cache import KIND, cache_length
from prospect.stream.decode import decode_lanes
from prospect.stream.feed import Lane, LaneFailures, forward_lanes, synchronize


def summarize_lanes(failures: LaneFailures, lanes: list[Lane], reduces: Callable[[Lane], bool]) -> None:
    """Decode as one batch the summaries that the reductions about to run will ask for: those of the live
    `lanes` for which `reduces(lane)` holds (exactly the condition under which the caller reduces next) and
    whose strategy plans one (`planned_summary`), with room for at least one token. Fewer than two such lanes:
    nothing to batch, each summary is decoded when its reduction asks. As for batched replies, an error in the
    batch fails every lane of it."""
    asking: dict[int, tuple[str, int, list[int], int]] = {}
    for lane in [lane for lane in lanes if lane in failures.alive]:
        plan = lane.strategy.planned_summary()
        if plan is None or not reduces(lane):
            continue
        prompt, max_new_tokens = plan
        ids = lane._summary_ids(prompt)
        room = lane._summary_room(ids)
        if room >= 1:  # else the reduction warns and restarts without a summary, as alone
            asking[id(lane)] = (prompt, max_new_tokens, ids, min(max_new_tokens, room))
    group = [lane for lane in lanes if id(lane) in asking]
    if len(group) < 2:
        return
    device = group[0].model.device
    synchronize(device)
    t0 = time.perf_counter()

    def summarize(live: list[Lane]) -> None:
        before = {id(lane): cache_length(lane.cache) for lane in live}
        logits = forward_lanes(live, [asking[id(lane)][2] for lane in live], kind=KIND["summary"])
        limits = [asking[id(lane)][3] for lane in live]
        replies = decode_lanes(live, torch.stack(logits), limits, timing_key="summary_ms", kind=KIND["summary"])
        for lane, tokens in zip(live, replies):
            prompt, max_new_tokens = asking[id(lane)][:2]
            lane._ready_summary = (prompt, max_new_tokens, lane.model.decode(tokens), before[id(lane)], cache_length(lane.cache))
            lane._timing["summary_tokens"] = lane._timing.get("summary_tokens", 0) + len(tokens)

    failures.together(group, summarize)
    synchronize(device)
    elapsed = (time.perf_counter() - t0) * 1000
    for lane in [lane for lane in group if lane in failures.alive]:
        lane._timing["reduce_ms"] += elapsed  # alone, the summary is part of its reduction's time
