"""What the stream's modules share: which frames are fed with which turns, the provenance kind of a turn,
CUDA-synchronized timing and peak memory, the vision features of the fed frames, one forward step over
lanes, and the per-lane failure bookkeeping."""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from typing import Any, Callable

import torch

from prospect.cache import KIND, Provenance, cache_length
from prospect.data.types import Conversation, StreamFrame, Turn
from prospect.models.static_forward import CompiledBlocks
from prospect.models.vlm import VisionLanguageModel
from prospect.stream.frame_record import ConversationResult

# A lane: a prospect.stream.runner.StreamRunner. Named by this alias, not imported: runner.py imports the
# stream's step modules, which read its lanes' attributes only.
Lane = Any

log = logging.getLogger(__name__)

KNOWLEDGE_PREFIX = "Task knowledge:"  # ProAssist's knowledge system turn (kept for summaries)
SCORE_ALIGN = 16  # a scored reference is fed padded to a multiple of this many tokens (room allowing): few graph shapes


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset; CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def turn_kind(turn: Turn) -> int:
    """The provenance kind of a fed text turn (ProAssist's knowledge is a system turn)."""
    if turn.role == "system":
        return KIND["knowledge"] if turn.content.startswith(KNOWLEDGE_PREFIX) else KIND["system"]
    return KIND["user"] if turn.role == "user" else KIND["assistant"]


def frames_to_feed(conversation: Conversation, stride: int) -> list[tuple[StreamFrame, tuple[Turn, ...], tuple[str, ...]]]:
    """(frame, turns fed before it, references due at it) for every `stride`-th frame; gt_turns speaks at the
    frames with references due.

    Turns and references of skipped frames move to the next fed frame, so nothing is lost by striding;
    references stay at their own frame for evaluation.
    """
    fed = []
    turns: list[Turn] = []
    due: list[str] = []
    last = len(conversation.frames) - 1
    for frame in conversation.frames:
        turns.extend(frame.turns_before)
        if frame.reference is not None:
            due.append(frame.reference)
        if frame.index % stride == 0 or frame.index == last:
            fed.append((frame, tuple(turns), tuple(due)))
            turns, due = [], []
    return fed


def frame_features(model: VisionLanguageModel, conversation: Conversation, frames: list[StreamFrame], batch: int,
                   compiled: CompiledBlocks | None = None):
    """(image features, vision ms per frame) of the fed frames, in order, `batch` frames per vision call (with
    `compiled`, the vision tower's compiled layers)."""
    device = model.device
    for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        images = [conversation.image(frame.index) for frame in chunk]
        synchronize(device)
        t0 = time.perf_counter()
        with compiled.encoding() if compiled is not None else contextlib.nullcontext():
            encoded = model.image_features(images)
        synchronize(device)
        per_frame = (time.perf_counter() - t0) * 1000 / len(chunk)
        for row in encoded:
            yield row, per_frame


def forward_lanes(
    lanes: list[Lane],
    ids: list[list[int]],
    image: torch.Tensor | list[torch.Tensor] | None = None,
    kind: int | None = None,
    provenances: list[Provenance] | None = None,
    all_logits: bool = False,
    append: bool = True,
) -> list[torch.Tensor]:
    """Feed `ids[i]` to lane i and return each lane's last logits (every token's with all_logits). `image`: the
    image features of a frame every lane feeds, or a list with each lane's own. Lanes on one StaticForward whose
    chunks have one length are one step (lanes streaming different conversations may feed chunks of several
    lengths: one step per length); other lanes go one after the other. append=False: computed on top of each
    cache, which is left as it was (a measurement, see score_references and probe_speak)."""
    if not lanes:
        return []
    if provenances is None:
        provenances = [Provenance.of(len(chunk), KIND["assistant"] if kind is None else kind) for chunk in ids]
    images = list(image) if isinstance(image, (list, tuple)) else [image] * len(lanes)
    static = lanes[0].static
    if len(lanes) == 1 or static is None or any(lane.static is not static for lane in lanes):
        return [lane._forward(chunk, own_image, provenance=p, all_logits=all_logits, append=append)
                for lane, chunk, own_image, p in zip(lanes, ids, images, provenances)]
    by_length: dict[int, list[int]] = {}
    for index, chunk in enumerate(ids):
        by_length.setdefault(len(chunk), []).append(index)
    out: list[torch.Tensor | None] = [None] * len(lanes)
    for group in by_length.values():
        members = [lanes[i] for i in group]
        firsts = [lane.cache.next_position for lane in members]
        step_image = [images[i] for i in group] if isinstance(image, (list, tuple)) else image
        logits = static.forward_lanes([lane.cache for lane in members], [ids[i] for i in group], step_image, all_logits,
                                      [provenances[i] for i in group], append)
        for row, index, lane, first in zip(logits, group, members, firsts):
            out[index] = row
            lane._cache_max = max(lane._cache_max, cache_length(lane.cache))
            if lane.on_forward is not None and append:
                lane.on_forward(ids[index], images[index], torch.arange(first, first + len(ids[index])), row)
    return out


class LaneFailures:
    """Per-lane error handling of `stream_lanes`: with `isolate`, a lane that raises is recorded failed (its
    result's error) and leaves this conversation while the others go on; without, the error propagates."""

    def __init__(self, lanes: list[Lane], results: list[ConversationResult], isolate: bool):
        self.results = {id(lane): result for lane, result in zip(lanes, results)}
        self.isolate = isolate
        self.alive = list(lanes)

    def fail(self, lanes: list[Lane], error: Exception) -> None:
        if not self.isolate:
            raise error
        for lane in lanes:
            if lane in self.alive:
                self.alive.remove(lane)
                result = self.results[id(lane)]
                result.error = f"{type(error).__name__}: {error}"
                log.error("lane %s (%s): conversation %s failed after %d frames: %s", lane.lane, lane.strategy.name,
                          result.conversation.id, len(result.trace), result.error)

    def each(self, lanes: list[Lane], action: Callable[[Lane], Any]) -> dict[int, Any]:
        """action(lane) for each live lane of `lanes`; returns {id(lane): value} of those that did not fail."""
        values = {}
        for lane in [lane for lane in lanes if lane in self.alive]:
            try:
                values[id(lane)] = action(lane)
            except Exception as error:
                self.fail([lane], error)
        return values

    def together(self, lanes: list[Lane], action: Callable[[list[Lane]], Any]) -> Any:
        """action(live lanes) once; if it raises, every one of them failed. Returns its value or None."""
        lanes = [lane for lane in lanes if lane in self.alive]
        try:
            return action(lanes) if lanes else None
        except Exception as error:
            self.fail(lanes, error)
            return None
