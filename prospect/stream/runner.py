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
from prospect.context_strategies.base import check_field_types
from prospect.data.types import Conversation, StreamFrame, Turn
from prospect.models.vlm import VisionLanguageModel
from prospect.stream.decode import pick_token, suppression_bias
from prospect.stream.talk import TALK_POLICIES, not_talk_probability

log = logging.getLogger(__name__)

KNOWLEDGE_PREFIX = "Task knowledge:"  # ProAssist's knowledge system turn (kept for summaries)


@dataclass
class StreamSettings:
    """How frames are fed and replies decoded. Token counts are tokens, thresholds probabilities."""

    max_new_tokens: int = 100
    talk_policy: str = "gt_turns"
    talk_threshold: float = 0.5
    temperature: float = 0.0
    top_p: float = 1.0
    min_new_tokens: int = 1  # the end of turn is excluded before this many tokens (a reply was asked for)
    frame_stride: int = 1
    seed: int = 0
    # Speed (same semantics): "auto" = on CUDA. Frames are known ahead in offline evaluation, so the vision
    # tower encodes vision_batch_size frames per call; optimized runs the language model over the fixed-size
    # KV buffer with a mask and replays CUDA graphs (prospect/models/static_forward.py).
    vision_batch_size: int | str = "auto"
    optimized: bool | str = "auto"

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.talk_policy not in TALK_POLICIES:
            raise ValueError(f"talk_policy={self.talk_policy}: choose one of: {', '.join(TALK_POLICIES)}")
        for name in ("frame_stride", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens}: must be in [0, max_new_tokens={self.max_new_tokens}]")
        for name, low, high in (("talk_threshold", 0.0, 1.0), ("temperature", 0.0, 100.0)):
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [{low}, {high}]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0.0, 1.0]")
        if self.optimized not in ("auto", True, False):
            raise ValueError(f"optimized={self.optimized}: choose one of: auto, true, false")
        if self.vision_batch_size != "auto" and (
            isinstance(self.vision_batch_size, bool) or not isinstance(self.vision_batch_size, int) or self.vision_batch_size < 1
        ):
            raise ValueError(f"vision_batch_size={self.vision_batch_size}: must be auto or an integer >= 1")


def check_reply_fits(strategy: BaseContextStrategy, settings: StreamSettings) -> None:
    """A reply of max_new_tokens must fit under the strategy's reduction threshold."""
    room = strategy.max_seq_len - strategy.reserved_seq_len
    if settings.max_new_tokens >= room:
        raise ValueError(f"max_new_tokens={settings.max_new_tokens}: must be < max_seq_len - reserved_seq_len ({room})")


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
        """Frames where the model spoke or a reference exists: {index, time, gen, ref} (DESIGN §6)."""
        rows = []
        for frame in self.conversation.frames:
            gen, ref = self.replies.get(frame.index, ""), frame.reference or ""
            if gen or ref:
                rows.append({"index": frame.index, "time": frame.time, "gen": gen, "ref": ref})
        return rows


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


def frames_to_feed(conversation: Conversation, stride: int) -> list[tuple[StreamFrame, tuple[Turn, ...], bool]]:
    """(frame, turns fed before it, speaks under gt_turns) for every `stride`-th frame.

    Turns and references of skipped frames move to the next fed frame, so nothing is lost by striding;
    references stay at their own frame for evaluation.
    """
    fed = []
    turns: list[Turn] = []
    due = False
    last = len(conversation.frames) - 1
    for frame in conversation.frames:
        turns.extend(frame.turns_before)
        due = due or frame.reference is not None
        if frame.index % stride == 0 or frame.index == last:
            fed.append((frame, tuple(turns), due))
            turns, due = [], False
    return fed


class StreamRunner:
    """Streams conversations through one model under one context strategy."""

    def __init__(
        self,
        model: VisionLanguageModel,
        strategy: BaseContextStrategy,
        settings: StreamSettings | None = None,
        on_forward: Callable[[list[int], torch.Tensor | None, torch.Tensor, torch.Tensor], None] | None = None,
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
        self.static = None
        if self.optimized:
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
        model, strategy, settings = self.model, self.strategy, self.settings
        device = model.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        generator = torch.Generator().manual_seed(settings.seed)
        self.cache = self.static.cache() if self.static is not None else model.new_cache(self.capacity, self.record_queries)
        self._generator = generator
        self._knowledge = ""
        self._conversation = conversation
        self._cache_max = 0
        started = time.perf_counter()

        system = model.chat.stream_start
        if conversation.system_prompt:
            system += model.chat.text_turn("system", conversation.system_prompt)
        if system:
            self._forward(model.encode(system), kind=KIND["system"])
        strategy.start_stream(prompt_len=cache_length(self.cache))
        pending: list[int] = []
        self._pending_kind = KIND["system"]
        initial_captured = False

        schedule = frames_to_feed(conversation, settings.frame_stride)
        features = self._frame_features(conversation, [frame for frame, _, _ in schedule])
        iterator = schedule
        if progress:
            from tqdm import tqdm

            iterator = tqdm(schedule, desc=conversation.id, unit="frame", leave=False)
        for frame, turns, reference_due in iterator:
            _synchronize(device)
            frame_start = time.perf_counter()
            record: dict[str, Any] = {
                "conversation": conversation.id,
                "index": frame.index,
                "time": frame.time,
                "cache_before": cache_length(self.cache),
                "events": ["frame"],
            }
            timing = {"vision_ms": 0.0, "frame_prefill_ms": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0, "reduce_ms": 0.0}
            self._cache_max = cache_length(self.cache)
            self._timing = timing
            for turn in turns:
                if turn.role == "system" and turn.content.startswith(KNOWLEDGE_PREFIX):
                    self._knowledge = turn.content
            pieces = [(model.chat.text_turn(t.role, t.content), turn_kind(t), -1) for t in turns]
            pieces.append((model.chat.frame(model.image_tokens, frame.time), KIND["frame_text"], frame.index))
            text_ids, text_provenance = model.encode_labeled(pieces)
            pending = self._make_room(len(pending) + len(text_ids), pending, record, frame)
            image = next(features)
            _synchronize(device)
            t0 = time.perf_counter()
            provenance = Provenance.concat([Provenance.of(len(pending), self._pending_kind), text_provenance])
            self._forward(pending + text_ids, image, provenance=provenance)
            _synchronize(device)
            timing["frame_prefill_ms"] = self._elapsed_ms(t0)
            timing["prefill_ms"] += timing["frame_prefill_ms"]
            record["chunk_tokens"] = len(pending) + len(text_ids)
            pending = []

            speak = reference_due if settings.talk_policy == "gt_turns" else None
            reply_ids = self._reply(speak, record, frame)
            if reply_ids is not None:
                reply = model.decode(reply_ids)
                result.replies[frame.index] = reply
                record["reply"] = reply
                record["events"].append("speak")
            record["generated_tokens"] = len(reply_ids or [])

            if not initial_captured and any(t.role == "user" for t in turns):
                strategy.set_initial_cache(self.cache)
                initial_captured = True
            if strategy.should_reduce_cache(cache_length(self.cache)):
                pending = self._reduce(pending, record, frame)
            _synchronize(device)
            record.update(timing)
            record["cache_after"] = cache_length(self.cache)
            record["cache_frame_tokens"] = self.cache.frame_tokens()
            record["cache_dialogue_tokens"] = record["cache_after"] - record["cache_frame_tokens"]
            record["cache_max"] = self._cache_max  # the most tokens held during this frame step
            record["next_position"] = self.cache.next_position
            record["pending_tokens"] = len(pending)
            record["wall_ms"] = self._elapsed_ms(frame_start)
            result.trace.append(record)
            if on_frame is not None:
                on_frame(record)
            if cache_length(self.cache) > self.capacity:  # the invariant; a bug if it ever fires
                raise ContextOverflowError(f"cache holds {cache_length(self.cache)} tokens > capacity {self.capacity}")
        result.wall_s = time.perf_counter() - started
        result.peak_memory_mb = peak_memory_mb(device)
        return result

    # ---- pieces ----------------------------------------------------------------------------------

    @staticmethod
    def _elapsed_ms(start: float) -> float:
        return (time.perf_counter() - start) * 1000

    def _forward(
        self, ids: list[int], image: torch.Tensor | None = None, kind: int | None = None, provenance: Provenance | None = None
    ) -> torch.Tensor:
        """Feed `ids` (labelled by `provenance`, or all of one `kind`) into the cache; returns the last logits."""
        cache = self.cache
        first = cache.next_position
        step = self.static if self.static is not None else self.model.forward
        if provenance is None:
            provenance = Provenance.of(len(ids), KIND["assistant"] if kind is None else kind)
        logits = step(ids, cache, image, provenance=provenance)
        self._cache_max = max(self._cache_max, cache_length(cache))
        if self.on_forward is not None:
            self.on_forward(ids, image, torch.arange(first, first + len(ids)), logits)
        return logits

    def _frame_features(self, conversation: Conversation, frames: list[StreamFrame]):
        """Image features of the fed frames, in order, computed `vision_batch_size` frames at a time."""
        batch = self.vision_batch_size
        device = self.model.device
        for start in range(0, len(frames), batch):
            chunk = frames[start : start + batch]
            images = [conversation.image(frame.index) for frame in chunk]
            _synchronize(device)
            t0 = time.perf_counter()
            encoded = self.model.image_features(images)
            _synchronize(device)
            per_frame = self._elapsed_ms(t0) / len(chunk)
            for row in encoded:
                self._timing["vision_ms"] = per_frame
                yield row

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

    def _reply(self, speak: bool | None, record: dict, frame: StreamFrame) -> list[int] | None:
        """Prompt an assistant turn and decode it; None when the assistant stays silent.

        speak=None asks the threshold policy (ProAssist's not-talk probability on the first token).
        """
        settings = self.settings
        if speak is False:
            return None
        budget = len(self.prompt_ids) + settings.max_new_tokens + len(self.closing_ids)
        pending = self._make_room(budget, [], record, frame)
        if pending:  # a reduction (summary) just queued a new context: feed it before the prompt
            self._forward(pending, kind=self._pending_kind)
        t0 = time.perf_counter()
        logits = self._forward(self.prompt_ids, kind=KIND["assistant"])
        self._timing["prefill_ms"] += self._elapsed_ms(t0)
        if speak is None:
            probability = not_talk_probability(logits, self.model.stop_ids)
            record["not_talk_probability"] = probability
            if probability > settings.talk_threshold:
                crop_end(self.cache, len(self.prompt_ids))
                return None
        return self._decode(logits, settings.max_new_tokens)

    def _decode(self, logits: torch.Tensor, max_new_tokens: int, timing_key: str = "decode_ms", kind: int = KIND["assistant"]) -> list[int]:
        """Decode after an assistant prompt until end of turn or max_new_tokens; the reply and its closing
        tokens stay in the cache. The end-of-turn token is excluded for the first min_new_tokens steps.

        Timing: `timing_key` (decode_ms for replies, summary_ms for summaries) covers choosing every token and
        feeding all but the last; the last token is fed with the closing tokens (counted in prefill_ms)."""
        settings, model = self.settings, self.model
        tokens: list[int] = []
        stopped = False
        t0 = time.perf_counter()
        for step in range(max_new_tokens):
            bias = self._bias_early if step < settings.min_new_tokens else self._bias_late
            token = pick_token(logits, bias, settings.temperature, settings.top_p, self._generator)
            if token in model.stop_ids:
                stopped = True
                break
            tokens.append(token)
            if step == max_new_tokens - 1:
                break
            logits = self._forward([token], kind=kind)
        self._timing[timing_key] = self._timing.get(timing_key, 0.0) + self._elapsed_ms(t0)
        t0 = time.perf_counter()
        tail = [] if stopped or not tokens else [tokens[-1]]
        self._forward(tail + self.closing_ids, kind=kind)
        self._timing["prefill_ms"] += self._elapsed_ms(t0)
        return tokens

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
