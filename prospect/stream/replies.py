"""The reply steps over the lanes of one frame: the talk decision (threshold probe or gt_turns), the
speak probe, the teacher-forced reference scores and the decode chains, batched over the lanes that speak."""

from __future__ import annotations

import logging
import time

import torch

from prospect.cache import KIND, cache_length, crop_end
from prospect.data.types import StreamFrame
from prospect.stream.decode import pick_token
from prospect.stream.reference_scores import token_scores
from prospect.stream.feed import SCORE_ALIGN, Lane, LaneFailures, forward_lanes
from prospect.stream.frame_record import FrameRecord
from prospect.stream.talk import not_talk_probability

log = logging.getLogger(__name__)


def reply_lanes(
    failures: LaneFailures, speak: bool | None, records: dict[int, FrameRecord], frame: StreamFrame, references: tuple[str, ...] = ()
) -> dict[int, list[int]]:
    """Prompt an assistant turn in every live lane and decode the replies together: {id(lane): reply ids} of
    the lanes that spoke. speak=None asks the threshold policy (ProAssist's not-talk probability on the first
    token) in each lane; False: nobody speaks (gt_turns at a frame without a reference: P(speak) is probed,
    see probe_speak).

    Measurements that change nothing (StreamSettings.reference_scores / speak_probe): with `references` due,
    each lane scores them teacher-forced on top of its reply prompt before it decides or decodes
    (score_references); every lane that prompted records `speak_probability` = 1 - P(end of turn first)."""
    if speak is False:
        probe_speak(failures, records)
        return {}
    lanes = list(failures.alive)

    def make_room(lane: Lane) -> None:
        budget = len(lane.prompt_ids) + lane.settings.max_new_tokens + len(lane.closing_ids)
        pending = lane._make_room(budget, [], records[id(lane)], frame)
        if pending:  # a reduction (summary) just queued a new context: feed it before the prompt
            lane._forward(pending, kind=lane._pending_kind)

    failures.each(lanes, make_room)
    t0 = time.perf_counter()
    prompts = failures.together(lanes, lambda live: dict(zip(map(id, live), forward_lanes(live, [lane.prompt_ids for lane in live], kind=KIND["assistant"]))))
    prompted = [lane for lane in lanes if lane in failures.alive]
    for lane in prompted:
        lane._timing["prefill_ms"] += (time.perf_counter() - t0) * 1000
    probabilities = {}
    for lane in prompted:
        if speak is None or lane.settings.speak_probe:
            probabilities[id(lane)] = not_talk_probability(prompts[id(lane)], lane.model.stop_ids)
            records[id(lane)]["speak_probability"] = 1.0 - probabilities[id(lane)]
    scoring = [lane for lane in prompted if references and lane.settings.reference_scores]
    if scoring:
        failures.together(scoring, lambda live: score_references(live, {id(lane): prompts[id(lane)] for lane in live}, references, records))
    speakers = []
    for lane in [lane for lane in prompted if lane in failures.alive]:
        if speak is None:
            probability = probabilities[id(lane)]
            records[id(lane)]["not_talk_probability"] = probability
            if probability > lane.settings.talk_threshold:
                crop_end(lane.cache, len(lane.prompt_ids))
                continue
        speakers.append(lane)
    if not speakers:
        return {}
    replies = failures.together(
        speakers,
        lambda live: dict(zip(map(id, live), decode_lanes(live, torch.stack([prompts[id(lane)] for lane in live]), live[0].settings.max_new_tokens))),
    )
    return replies or {}


def probe_speak(failures: LaneFailures, records: dict[int, FrameRecord]) -> None:
    """gt_turns at a frame without a reference: each live lane with speak_probe on reads P(speak) = 1 - P(end of
    turn first) after an assistant prompt it does not keep (one step for the lanes on a StaticForward); the
    cache is left exactly as it was. A lane whose cache has no room for the prompt records nothing (making room
    would be a reduction the stream does not make)."""
    lanes = [lane for lane in failures.alive if lane.settings.speak_probe
             and cache_length(lane.cache) + len(lane.prompt_ids) <= lane.capacity]
    if not lanes:
        return
    t0 = time.perf_counter()

    def probe(live: list[Lane]) -> None:
        logits = forward_lanes(live, [lane.prompt_ids for lane in live], kind=KIND["assistant"], append=False)
        for lane, row in zip(live, logits):
            records[id(lane)]["speak_probability"] = 1.0 - not_talk_probability(row, lane.model.stop_ids)

    failures.together(lanes, probe)
    elapsed = (time.perf_counter() - t0) * 1000
    for lane in lanes:
        lane._timing["probe_ms"] = elapsed


def score_references(lanes: list[Lane], prompt_logits: dict[int, torch.Tensor], references: tuple[str, ...],
                     records: dict[int, FrameRecord]) -> None:
    """Score the reference reply teacher-forced in each lane, which has just fed its reply prompt: the prompt's
    logits predict the reply's first token, and the reply's tokens fed on top of the cache without keeping them
    (append=False) predict the rest; lanes of one scored shape are one step. The reply's tokens are its text
    as a reply in the model's chat format (several references due at one fed frame, with frame_stride > 1, are
    one reply, joined by spaces); its end of turn is not scored. A reply longer than the room left in a lane's
    cache is scored on its first tokens that fit (`ref_truncated`). Records per lane `ref_nll` (summed negative
    log-likelihood, nats), `ref_tokens` and `ref_top1` (fraction of tokens that are the argmax)."""
    model = lanes[0].model
    target = model.encode(model.chat.reply_text(" ".join(references)))
    if not target:
        return
    t0 = time.perf_counter()
    # each lane's shape from its own room only (so a lane scores exactly as its job alone): the tokens that fit,
    # fed padded with the last one to a multiple of SCORE_ALIGN where the room allows (the padding's logits unread)
    shapes: dict[tuple[int, int], list[Lane]] = {}
    for lane in lanes:
        room = lane.capacity - cache_length(lane.cache)
        length = min(len(target), room + 1)
        padded = min(-(-(length - 1) // SCORE_ALIGN) * SCORE_ALIGN, room)
        shapes.setdefault((length, padded), []).append(lane)
    for (length, padded), group in shapes.items():
        chunk = target[: length - 1] + target[length - 2 : length - 1] * (padded - length + 1)
        fed = forward_lanes(group, [chunk] * len(group), all_logits=True, append=False) if length > 1 else [None] * len(group)
        for lane, rest in zip(group, fed):
            logits = prompt_logits[id(lane)][None] if rest is None else torch.cat([prompt_logits[id(lane)][None], rest[: length - 1]])
            nll, hits = token_scores(logits, target[:length])
            record = records[id(lane)]
            record.update(ref_nll=nll, ref_tokens=length, ref_top1=hits / length)
            if length < len(target):
                record["ref_truncated"] = True
    elapsed = (time.perf_counter() - t0) * 1000
    for lane in lanes:
        lane._timing["score_ms"] = elapsed


def decode_lanes(
    lanes: list[Lane], logits: torch.Tensor, max_new_tokens: int, timing_key: str = "decode_ms", kind: int = KIND["assistant"]
) -> list[list[int]]:
    """Decode each lane's reply from its prompt logits (`logits[i]`) until its end of turn or max_new_tokens,
    the lanes still speaking as one step; each reply and its closing tokens stay in its lane's cache. The
    end-of-turn token is excluded for the first min_new_tokens steps. Greedy lanes on one StaticForward choose
    their tokens on the device (StaticForward.decode_greedy: one host read per chain of steps); sampling, and
    the eager path, choose them on the host, one read per token.

    Timing: `timing_key` (decode_ms for replies, summary_ms for summaries) covers choosing every token and
    feeding all but the last; the last token is fed with the closing tokens (counted in prefill_ms)."""
    t0 = time.perf_counter()
    static = lanes[0].static
    if static is not None and all(lane.static is static and lane.on_forward is None for lane in lanes) and all(
        lane.settings.temperature <= 0 and lane.settings.min_new_tokens == lanes[0].settings.min_new_tokens for lane in lanes
    ):  # greedy: the token choice and the stop check stay on the device (StaticForward.decode_greedy)
        replies = static.decode_greedy([lane.cache for lane in lanes], list(logits), [(lane._bias_early, lane._bias_late) for lane in lanes],
                                       lanes[0].settings.min_new_tokens, max_new_tokens, kind)
        tokens = {id(lane): reply for lane, (reply, _) in zip(lanes, replies)}
        stopped = {id(lane): stop for lane, (_, stop) in zip(lanes, replies)}
        for lane in lanes:
            lane._cache_max = max(lane._cache_max, cache_length(lane.cache))
    else:
        tokens, stopped = _choose_on_host(lanes, logits, max_new_tokens, kind)
    elapsed = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    closings: dict[int, list[Lane]] = {}
    for lane in lanes:
        lane._timing[timing_key] = lane._timing.get(timing_key, 0.0) + elapsed
        reply = tokens[id(lane)]
        tail = [] if stopped[id(lane)] or not reply else [reply[-1]]
        closings.setdefault(len(tail), []).append(lane)
    for tail_len, group in closings.items():
        forward_lanes(group, [tokens[id(lane)][-1:][:tail_len] + lane.closing_ids for lane in group], kind=kind)
    elapsed = (time.perf_counter() - t0) * 1000
    for lane in lanes:
        lane._timing["prefill_ms"] += elapsed
    return [tokens[id(lane)] for lane in lanes]


def _choose_on_host(lanes: list[Lane], logits: torch.Tensor, max_new_tokens: int, kind: int) -> tuple[dict, dict]:
    """decode_lanes' token choice, one host read per token and lane (sampling, or lanes without a shared
    StaticForward): ({id(lane): reply}, {id(lane): whether a stop id ended it})."""
    tokens: dict[int, list[int]] = {id(lane): [] for lane in lanes}
    stopped: dict[int, bool] = {id(lane): False for lane in lanes}
    active, rows = list(lanes), list(logits)
    for step in range(max_new_tokens):
        going = []
        for lane, row in zip(active, rows):
            settings = lane.settings
            bias = lane._bias_early if step < settings.min_new_tokens else lane._bias_late
            token = pick_token(row, bias, settings.temperature, settings.top_p, lane._generator)
            if token in lane.model.stop_ids:
                stopped[id(lane)] = True
                continue
            tokens[id(lane)].append(token)
            going.append(lane)
        if step == max_new_tokens - 1 or not going:
            break
        rows = forward_lanes(going, [[tokens[id(lane)][-1]] for lane in going], kind=kind)
        active = going
    return tokens, stopped
