"""The per-frame stream (ProAssist protocol on SmolVLM2's chat format).

For each frame, in order: the system/user turns due before it are added as text before the frame's
image tokens and the chunk is prefilled into one KV cache at explicit positions; the talk policy
decides whether the assistant speaks; a reply is decoded token by token (greedy by default) and stays
in the cache; the context strategy reduces the cache when it reaches its threshold. The cache never
holds more than the strategy's capacity: if the next chunk (frame, reply or summary) would not fit,
the strategy reduces first. Ground-truth assistant turns are never fed.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from prospect.cache import KIND, PositionedCache, Provenance, cache_length, crop_end, keep_spans, recover_provenance
from prospect.context_strategies import BaseContextStrategy, ContextOverflowError
from prospect.data.types import Conversation, StreamFrame, Turn
from prospect.models.vlm import VisionLanguageModel
from prospect.stream.decode import pick_token, suppression_bias
from prospect.stream.reference_scores import TURN_FIELDS, token_scores
from prospect.stream.settings import StreamSettings, check_reply_fits
from prospect.stream.talk import not_talk_probability

log = logging.getLogger(__name__)

KNOWLEDGE_PREFIX = "Task knowledge:"  # ProAssist's knowledge system turn (kept for summaries)
SCORE_ALIGN = 16  # a scored reference is fed padded to a multiple of this many tokens (room allowing): few graph shapes
# the trace record's timings (ms): they differ between runs that compute the same thing
TIMING_FIELDS = ("vision_ms", "frame_prefill_ms", "prefill_ms", "decode_ms", "reduce_ms", "summary_ms", "probe_ms", "score_ms", "wall_ms")


@dataclass
class ConversationResult:
    """What one conversation produced; filled frame by frame, so a failure keeps what was computed."""

    conversation: Conversation
    replies: dict[int, str] = field(default_factory=dict)  # stream index -> generated text
    trace: list[dict] = field(default_factory=list)  # one record per processed frame
    summaries: list[str] = field(default_factory=list)
    peak_memory_mb: float = 0.0
    wall_s: float = 0.0
    error: str | None = None

    def prediction_frames(self) -> list[dict]:
        """Frames where the model spoke, a reference exists or a reference was scored: {index, time, gen, ref}
        and, where scored, the reference's teacher-forced scores (TURN_FIELDS)."""
        scored = {r["index"]: {k: r[k] for k in TURN_FIELDS if k in r} for r in self.trace if "ref_nll" in r}
        rows = []
        for frame in self.conversation.frames:
            gen, ref = self.replies.get(frame.index, ""), frame.reference or ""
            if gen or ref or frame.index in scored:
                rows.append({"index": frame.index, "time": frame.time, "gen": gen, "ref": ref, **scored.get(frame.index, {})})
        return rows

    def speak_probabilities(self) -> dict | None:
        """P(speak) of every probed fed frame, as predictions.json holds it: {"index", "p", "due"} (parallel
        lists; due: a reference is due at that frame); None when no frame was probed."""
        probed = [r for r in self.trace if "speak_probability" in r]
        if not probed:
            return None
        return {"index": [r["index"] for r in probed], "p": [r["speak_probability"] for r in probed],
                "due": [bool(r.get("reference_due")) for r in probed]}


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset; CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _synchronize(device: torch.device) -> None:
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


class StreamRunner:
    """Streams conversations through one model under one context strategy (one lane of `stream_lanes`).

    `static` / `lane`: run on lane `lane` of a shared StaticForward (prospect.stream.lanes builds them);
    by default an optimized runner makes its own one-lane StaticForward."""

    def __init__(
        self,
        model: VisionLanguageModel,
        strategy: BaseContextStrategy,
        settings: StreamSettings | None = None,
        on_forward: Callable[[list[int], torch.Tensor | None, torch.Tensor, torch.Tensor], None] | None = None,
        static: Any = None,
        lane: int = 0,
    ):
        self.model = model
        self.strategy = strategy
        self.settings = settings or StreamSettings()
        self.on_forward = on_forward  # (ids, image_features, positions, logits) after each forward: for tests
        self.cache: PositionedCache | None = None
        chat = model.chat
        self.prompt_ids = model.encode(chat.assistant_prompt)
        self.closing_ids = model.encode(chat.turn_closing)
        self.capacity = strategy.capacity(model.max_positions)
        check_reply_fits(strategy, self.settings)
        on_cuda = model.device.type == "cuda"
        self.optimized = on_cuda if self.settings.optimized == "auto" else bool(self.settings.optimized)
        batch = self.settings.vision_batch_size
        self.vision_batch_size = 8 if batch == "auto" else int(batch)  # 8: vision ~2.8 ms/frame on an H200 at +~165 MiB
        vocab = model.model.lm_head.out_features
        self._bias_early = suppression_bias(vocab, model.suppressed_ids + model.stop_ids, model.device)  # before min_new_tokens
        self._bias_late = suppression_bias(vocab, model.suppressed_ids, model.device)
        self.record_queries = bool(getattr(strategy, "records_queries", False))  # SnapKV-style scores read them
        self.lane = lane
        self.static = static
        if static is not None:
            self.optimized = True
            if static.capacities[lane] != self.capacity:
                raise ValueError(f"lane {lane} holds {static.capacities[lane]} tokens, strategy {strategy.name} needs {self.capacity}")
            if self.record_queries and not static.record_queries:
                raise ValueError(f"strategy {strategy.name} reads queries: the shared StaticForward must record them")
        elif self.optimized:
            from prospect.models.static_forward import StaticForward

            self.static = StaticForward(model, self.capacity, record_queries=self.record_queries)

    # ---- one conversation ----------------------------------------------------------------------

    def run(
        self,
        conversation: Conversation,
        result: ConversationResult | None = None,
        progress: bool = False,
        on_frame: Callable[[dict], None] | None = None,
    ) -> ConversationResult:
        """Stream one conversation. Pass `result` to keep the partial output if this raises.

        `on_frame(record)` is called after each processed frame, once its record is in `result.trace` and
        its reply in `result.replies`: the safe point between frames. Whatever it raises stops the stream
        there (prospect.experiment streams the trace to disk and stops on signals through it)."""
        result = result or ConversationResult(conversation)
        stream_lanes([self], conversation, [result], progress, [on_frame], isolate=False)
        return result

    def _start(self, conversation: Conversation, cache: PositionedCache) -> None:
        """Begin a conversation on an empty `cache`."""
        self._generator = torch.Generator().manual_seed(self.settings.seed)
        self.cache = cache
        self._knowledge = ""
        self._conversation = conversation
        self._cache_max = 0
        self._pending: list[int] = []
        self._pending_kind = KIND["system"]
        self._initial_captured = False

    # ---- pieces ----------------------------------------------------------------------------------

    @staticmethod
    def _elapsed_ms(start: float) -> float:
        return (time.perf_counter() - start) * 1000

    def _forward(
        self, ids: list[int], image: torch.Tensor | None = None, kind: int | None = None, provenance: Provenance | None = None,
        all_logits: bool = False, append: bool = True,
    ) -> torch.Tensor:
        """Feed `ids` (labelled by `provenance`, or all of one `kind`) into the cache; returns the last logits
        (every token's with all_logits). append=False: the same logits, the cache left as it was."""
        cache = self.cache
        first = cache.next_position
        step = self.static if self.static is not None else self.model.forward
        if provenance is None:
            provenance = Provenance.of(len(ids), KIND["assistant"] if kind is None else kind)
        logits = step(ids, cache, image, all_logits=all_logits, provenance=provenance, append=append)
        self._cache_max = max(self._cache_max, cache_length(cache))
        if self.on_forward is not None and append:
            self.on_forward(ids, image, torch.arange(first, first + len(ids)), logits)
        return logits

    def _context(self, frame: StreamFrame) -> dict[str, Any]:
        chat = self.model.chat
        return {
            "model": self.model,
            "system_prompt": self._conversation.system_prompt,
            "knowledge": self._knowledge,
            "encode_system_turn": lambda text: self.model.encode(chat.stream_start + chat.text_turn("system", text)),
            "summarize": self._summarize,
            "frame_index": frame.index,
            "time": frame.time,
            "capacity": self.capacity,
        }

    def _reduce(self, pending: list[int], record: dict, frame: StreamFrame) -> list[int]:
        """Let the strategy reduce the cache; returns the tokens to feed before the next chunk."""
        _synchronize(self.model.device)
        t0 = time.perf_counter()
        before = cache_length(self.cache)
        cache, last_msg = self.strategy.handle_overflow(self.cache, pending, **self._context(frame))
        if cache is not self.cache:
            self._adopt(cache)
        self.cache.check()
        if last_msg and list(last_msg) != list(pending):  # a restart message (summary) replaces what was queued
            self._pending_kind = KIND["summary"] if self.strategy.event == "summary" else KIND["system"]
        _synchronize(self.model.device)
        record["events"].append(self.strategy.event)
        record.setdefault("reductions", []).append({"before": before, "after": cache_length(self.cache)})
        summary = getattr(self.strategy, "last_summary", None)
        if self.strategy.event == "summary" and summary is not None:
            record["summary"] = summary
        self._timing["reduce_ms"] += self._elapsed_ms(t0)
        return list(last_msg or [])

    def _adopt(self, cache: Any) -> PositionedCache:
        """A strategy returned a cache other than the one it got (a custom, seed-style strategy): its
        contents move into the runner's cache, whose buffers (and CUDA graphs) stay in place. Provenance
        comes with a PositionedCache; for a plain transformers cache each kept token is found again among
        the runner's tokens (still those before the reduction: the strategy built a new cache) by its
        layer-0 key, bitwise; tokens not found are unknown."""
        own = self.cache
        if cache is None:  # the seed's "drop everything"
            keep_spans(own, [])
            own.next_position = 0
            return own
        tensors = [(k.clone(), v.clone()) for k, v in cache.layer_tensors()] if isinstance(cache, PositionedCache) else [
            (layer.keys.clone(), layer.values.clone()) for layer in cache.layers if layer.is_initialized and layer.keys is not None
        ]
        length = tensors[0][0].shape[2] if tensors else 0
        if isinstance(cache, PositionedCache):
            cache.check()
            positions, next_position = cache.positions.clone(), cache.next_position
            labels = Provenance(*(t.clone() for t in cache.provenance))
        else:  # a plain transformers cache: positions are unknown, so they follow the cache length (seed behaviour)
            positions, next_position = torch.arange(length, dtype=torch.long), length
            own_keys = next(iter(own.layer_tensors()), (None, None))[0]
            labels = recover_provenance(tensors[0][0] if tensors else None, own_keys, own.provenance)
        for layer in own.layers:
            layer.reset()
        for layer_index, (keys, values) in enumerate(tensors):
            own.update(keys, values, layer_index)
        own.positions, own.next_position = positions, next_position
        own.kinds, own.frames, own.patches = labels
        return own

    def _make_room(self, needed: int, pending: list[int], record: dict, frame: StreamFrame) -> list[int]:
        """Reduce first when `needed` more tokens would not fit; raise if they still do not fit."""
        if cache_length(self.cache) + needed <= self.capacity:
            return pending
        extra = needed - len(pending)
        pending = self._reduce(pending, record, frame)
        if cache_length(self.cache) + len(pending) + extra > self.capacity:
            raise ContextOverflowError(
                f"frame {frame.index}: {len(pending) + extra} more tokens do not fit in the cache "
                f"({cache_length(self.cache)} tokens after strategy {self.strategy.name}, capacity {self.capacity})"
            )
        return pending

    def _decode(self, logits: torch.Tensor, max_new_tokens: int, timing_key: str = "decode_ms", kind: int = KIND["assistant"]) -> list[int]:
        """Decode after an assistant prompt (one lane; see decode_lanes)."""
        return decode_lanes([self], logits[None], max_new_tokens, timing_key, kind)[0]

    def _summarize(self, prompt: str, max_new_tokens: int) -> str:
        """Ask `prompt` as a system turn on top of the current cache and decode the answer (bounded by room)."""
        chat = self.model.chat
        ids = self.model.encode(chat.text_turn("system", prompt) + chat.assistant_prompt)
        room = self.capacity - cache_length(self.cache) - len(ids) - len(self.closing_ids)
        if room < 1:
            log.warning("no room left for a summary (cache %d tokens, capacity %d)", cache_length(self.cache), self.capacity)
            return ""
        logits = self._forward(ids, kind=KIND["summary"])
        tokens = self._decode(logits, min(max_new_tokens, room), timing_key="summary_ms", kind=KIND["summary"])
        self._timing["summary_tokens"] = self._timing.get("summary_tokens", 0) + len(tokens)
        return self.model.decode(tokens)


# ---- the frame loop over lanes ---------------------------------------------------------------------
# One job is one lane. Several lanes (jobs of a sweep that differ only in their strategy, see
# prospect.stream.lanes) stream the same conversation together: the frames, their vision features and the
# text turns are shared; each lane has its own strategy, cache, positions, provenance, trace and replies.
# Chunks that are the same for several lanes (a frame, the reply prompt, decode steps, closing tokens) go
# through the model as one step (StaticForward.forward_lanes); reductions, summaries and a summary's restart
# text touch their lane only. Every lane runs exactly the operations it runs alone, in the same order.


def frame_features(model: VisionLanguageModel, conversation: Conversation, frames: list[StreamFrame], batch: int):
    """(image features, vision ms per frame) of the fed frames, in order, `batch` frames per vision call."""
    device = model.device
    for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        images = [conversation.image(frame.index) for frame in chunk]
        _synchronize(device)
        t0 = time.perf_counter()
        encoded = model.image_features(images)
        _synchronize(device)
        per_frame = (time.perf_counter() - t0) * 1000 / len(chunk)
        for row in encoded:
            yield row, per_frame


def forward_lanes(
    lanes: list[StreamRunner],
    ids: list[list[int]],
    image: torch.Tensor | None = None,
    kind: int | None = None,
    provenances: list[Provenance] | None = None,
    all_logits: bool = False,
    append: bool = True,
) -> list[torch.Tensor]:
    """Feed `ids[i]` to lane i (one step for lanes on one StaticForward, else one after the other); returns each
    lane's last logits (every token's with all_logits). append=False: computed on top of each cache, which is
    left as it was (a measurement, see score_references and probe_speak)."""
    if not lanes:
        return []
    if provenances is None:
        provenances = [Provenance.of(len(chunk), KIND["assistant"] if kind is None else kind) for chunk in ids]
    static = lanes[0].static
    if len(lanes) == 1 or static is None or any(lane.static is not static for lane in lanes) or len({len(c) for c in ids}) > 1:
        return [lane._forward(chunk, image, provenance=p, all_logits=all_logits, append=append)
                for lane, chunk, p in zip(lanes, ids, provenances)]
    firsts = [lane.cache.next_position for lane in lanes]
    logits = static.forward_lanes([lane.cache for lane in lanes], ids, image, all_logits, provenances, append)
    for row, lane, chunk, first in zip(logits, lanes, ids, firsts):
        lane._cache_max = max(lane._cache_max, cache_length(lane.cache))
        if lane.on_forward is not None and append:
            lane.on_forward(chunk, image, torch.arange(first, first + len(chunk)), row)
    return list(logits)


class _LaneFailures:
    """Per-lane error handling of `stream_lanes`: with `isolate`, a lane that raises is recorded failed (its
    result's error) and leaves this conversation while the others go on; without, the error propagates."""

    def __init__(self, lanes: list[StreamRunner], results: list[ConversationResult], isolate: bool):
        self.results = {id(lane): result for lane, result in zip(lanes, results)}
        self.isolate = isolate
        self.alive = list(lanes)

    def fail(self, lanes: list[StreamRunner], error: Exception) -> None:
        if not self.isolate:
            raise error
        for lane in lanes:
            if lane in self.alive:
                self.alive.remove(lane)
                result = self.results[id(lane)]
                result.error = f"{type(error).__name__}: {error}"
                log.error("lane %s (%s): conversation %s failed after %d frames: %s", lane.lane, lane.strategy.name,
                          result.conversation.id, len(result.trace), result.error)

    def each(self, lanes: list[StreamRunner], action: Callable[[StreamRunner], Any]) -> dict[int, Any]:
        """action(lane) for each live lane of `lanes`; returns {id(lane): value} of those that did not fail."""
        values = {}
        for lane in [lane for lane in lanes if lane in self.alive]:
            try:
                values[id(lane)] = action(lane)
            except Exception as error:
                self.fail([lane], error)
        return values

    def together(self, lanes: list[StreamRunner], action: Callable[[list[StreamRunner]], Any]) -> Any:
        """action(live lanes) once; if it raises, every one of them failed. Returns its value or None."""
        lanes = [lane for lane in lanes if lane in self.alive]
        try:
            return action(lanes) if lanes else None
        except Exception as error:
            self.fail(lanes, error)
            return None


def stream_lanes(
    lanes: list[StreamRunner],
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
    raises is handled by `isolate` (see _LaneFailures)."""
    model = lanes[0].model
    settings = lanes[0].settings
    for lane in lanes[1:]:
        if lane.model is not model or (lane.settings.frame_stride, lane.vision_batch_size) != (settings.frame_stride, lanes[0].vision_batch_size):
            raise ValueError("lanes share the model, frame_stride and vision_batch_size")
    on_frames = on_frames or [None] * len(lanes)
    callbacks = {id(lane): callback for lane, callback in zip(lanes, on_frames)}
    failures = _LaneFailures(lanes, results, isolate)
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
        from tqdm import tqdm

        iterator = tqdm(schedule, desc=conversation.id, unit="frame", leave=False)
    records: dict[int, dict] = {}
    for frame, turns, references in iterator:
        if not failures.alive:
            break
        _synchronize(device)
        frame_start = time.perf_counter()
        for lane in failures.alive:
            records[id(lane)] = {
                "conversation": conversation.id,
                "index": frame.index,
                "time": frame.time,
                "cache_before": cache_length(lane.cache),
                "events": ["frame"],
                "reference_due": bool(references),
            }
            lane._timing = {"vision_ms": 0.0, "frame_prefill_ms": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0, "reduce_ms": 0.0}
            lane._cache_max = cache_length(lane.cache)
            for turn in turns:
                if turn.role == "system" and turn.content.startswith(KNOWLEDGE_PREFIX):
                    lane._knowledge = turn.content
        pieces = [(model.chat.text_turn(t.role, t.content), turn_kind(t), -1) for t in turns]
        pieces.append((model.chat.frame(model.image_tokens, frame.time), KIND["frame_text"], frame.index))
        text_ids, text_provenance = model.encode_labeled(pieces)

        def make_room(lane: StreamRunner) -> None:
            lane._pending = lane._make_room(len(lane._pending) + len(text_ids), lane._pending, records[id(lane)], frame)

        failures.each(lanes, make_room)
        image, vision_ms = next(features)
        for lane in failures.alive:
            lane._timing["vision_ms"] = vision_ms
        # the frame chunk: one step for the lanes with nothing pending, alone for a lane with a restart text
        plain = [lane for lane in failures.alive if not lane._pending]
        for group in [plain] + [[lane] for lane in failures.alive if lane._pending]:
            _synchronize(device)
            t0 = time.perf_counter()

            def feed(live: list[StreamRunner]) -> None:
                chunks = [lane._pending + text_ids for lane in live]
                provenances = [Provenance.concat([Provenance.of(len(lane._pending), lane._pending_kind), text_provenance]) for lane in live]
                forward_lanes(live, chunks, image, provenances=provenances)

            failures.together(group, feed)
            _synchronize(device)
            for lane in [lane for lane in group if lane in failures.alive]:
                lane._timing["frame_prefill_ms"] = (time.perf_counter() - t0) * 1000
                lane._timing["prefill_ms"] += lane._timing["frame_prefill_ms"]
                records[id(lane)]["chunk_tokens"] = len(lane._pending) + len(text_ids)
                lane._pending = []

        speak = bool(references) if settings.talk_policy == "gt_turns" else None
        replies = reply_lanes(failures, speak, records, frame, references)

        def finish_frame(lane: StreamRunner) -> None:
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
            if lane.strategy.should_reduce_cache(cache_length(lane.cache)):
                lane._pending = lane._reduce(lane._pending, record, frame)
            _synchronize(device)
            record.update(lane._timing)
            record["cache_after"] = cache_length(lane.cache)
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


def reply_lanes(
    failures: _LaneFailures, speak: bool | None, records: dict[int, dict], frame: StreamFrame, references: tuple[str, ...] = ()
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

    def make_room(lane: StreamRunner) -> None:
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


def probe_speak(failures: _LaneFailures, records: dict[int, dict]) -> None:
    """gt_turns at a frame without a reference: each live lane with speak_probe on reads P(speak) = 1 - P(end of
    turn first) after an assistant prompt it does not keep (one step for the lanes on a StaticForward); the
    cache is left exactly as it was. A lane whose cache has no room for the prompt records nothing (making room
    would be a reduction the stream does not make)."""
    lanes = [lane for lane in failures.alive if lane.settings.speak_probe
             and cache_length(lane.cache) + len(lane.prompt_ids) <= lane.capacity]
    if not lanes:
        return
    t0 = time.perf_counter()

    def probe(live: list[StreamRunner]) -> None:
        logits = forward_lanes(live, [lane.prompt_ids for lane in live], kind=KIND["assistant"], append=False)
        for lane, row in zip(live, logits):
            records[id(lane)]["speak_probability"] = 1.0 - not_talk_probability(row, lane.model.stop_ids)

    failures.together(lanes, probe)
    elapsed = (time.perf_counter() - t0) * 1000
    for lane in lanes:
        lane._timing["probe_ms"] = elapsed


def score_references(lanes: list[StreamRunner], prompt_logits: dict[int, torch.Tensor], references: tuple[str, ...],
                     records: dict[int, dict]) -> None:
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
    shapes: dict[tuple[int, int], list[StreamRunner]] = {}
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
    lanes: list[StreamRunner], logits: torch.Tensor, max_new_tokens: int, timing_key: str = "decode_ms", kind: int = KIND["assistant"]
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
    closings: dict[int, list[StreamRunner]] = {}
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


def _choose_on_host(lanes: list[StreamRunner], logits: torch.Tensor, max_new_tokens: int, kind: int) -> tuple[dict, dict]:
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
