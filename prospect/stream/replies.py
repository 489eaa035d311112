"""The reply steps over the lanes of one frame: the talk decision (threshold probe or gt_turns), the
speak probe, the teacher-forced reference scores and the replies (prospect.stream.decode), batched over the
lanes that speak."""

from __future__ import annotations

import logging
import time

import torch

from prospect.cache import KIND, cache_length, crop_end
from prospect.stream.decode import decode_lanes
from prospect.stream.reference_scores import token_scores
from prospect.stream.feed import SCORE_ALIGN, Lane, LaneFailures, forward_lanes
from prospect.stream.frame_record import FrameRecord
from prospect.stream.summaries import summarize_lanes
from prospect.stream.talk import not_talk_probability

log = logging.getLogger(__name__)


def speaks(lane: Lane) -> bool | None:
    """Whether the lane's talk policy has it speak at its frame: gt_turns, where a reference is due; threshold:
    None (its not-talk probability decides)."""
    return bool(lane._references) if lane.settings.talk_policy == "gt_turns" else None


def reply_lanes(failures: LaneFailures, lanes: list[Lane], records: dict[int, FrameRecord]) -> dict[int, list[int]]:
    """Prompt an assistant turn in each live lane of `lanes` that may speak at its frame (`lane._frame`, with the
    references `lane._references` due there) and decode the replies together: {id(lane): reply ids} of the
    lanes that spoke. Under the threshold policy each lane reads ProAssist's not-talk probability on the first
    token; under gt_turns a lane without a reference due stays silent (P(speak) is probed, see probe_speak).

    Measurements that change nothing (StreamSettings.reference_scores / speak_probe): with references due,
    each lane scores them teacher-forced on top of its reply prompt before it decides or decodes
    (score_references); every lane that prompted records `speak_probability` = 1 - P(end of turn first)."""
    lanes = [lane for lane in lanes if lane in failures.alive]
    silent = [lane for lane in lanes if speaks(lane) is False]
    if silent:
        probe_speak(failures, silent, records)
    lanes = [lane for lane in lanes if speaks(lane) is not False]
    if not lanes:
        return {}

    def make_room(lane: Lane) -> None:
        pending = lane._make_room(lane._reply_budget(), [], records[id(lane)], lane._frame)
        if pending:  # a reduction (summary) just queued a new context: feed it before the prompt
            lane._forward(pending, kind=lane._pending_kind)

    summarize_lanes(failures, lanes, lambda lane: lane._needs_room(lane._reply_budget()))
    failures.each(lanes, make_room)
    t0 = time.perf_counter()
    prompts = failures.together(lanes, lambda live: dict(zip(map(id, live), forward_lanes(live, [lane.prompt_ids for lane in live], kind=KIND["assistant"]))))
    prompted = [lane for lane in lanes if lane in failures.alive]
    for lane in prompted:
        lane._timing["prefill_ms"] += (time.perf_counter() - t0) * 1000
    probabilities = {}
    for lane in prompted:
        if speaks(lane) is None or lane.settings.speak_probe:
            probabilities[id(lane)] = not_talk_probability(prompts[id(lane)], lane.model.stop_ids)
            records[id(lane)]["speak_probability"] = 1.0 - probabilities[id(lane)]
    scoring: dict[tuple[str, ...], list[Lane]] = {}  # lanes of one conversation score the same references
    for lane in prompted:
        if lane._references and lane.settings.reference_scores:
            scoring.setdefault(tuple(lane._references), []).append(lane)
    for references, group in scoring.items():
        failures.together(group, lambda live: score_references(live, {id(lane): prompts[id(lane)] for lane in live}, references, records))
    speakers = []
    for lane in [lane for lane in prompted if lane in failures.alive]:
        if speaks(lane) is None:
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


def probe_speak(failures: LaneFailures, lanes: list[Lane], records: dict[int, FrameRecord]) -> None:
    """gt_turns at a frame without a reference: each live lane of `lanes` with speak_probe on reads P(speak) =
    1 - P(end of turn first) after an assistant prompt it does not keep (one step for the lanes on a
    StaticForward); the cache is left exactly as it was. A lane whose cache has no room for the prompt records
    nothing (making room would be a reduction the stream does not make)."""
    lanes = [lane for lane in lanes if lane in failures.alive and lane.settings.speak_probe
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
