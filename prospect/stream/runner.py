"""One job's stream state (ProAssist protocol on SmolVLM2's chat format): `StreamRunner`, one lane of
`prospect.stream.frame_loop.stream_lanes`.

For each frame, in order: the system/user turns due before it are added as text before the frame's
image tokens and the chunk is prefilled into one KV cache at explicit positions; the talk policy
decides whether the assistant speaks; a reply is decoded token by token (greedy by default) and stays
in the cache; the context strategy reduces the cache when it reaches its threshold. The cache never
holds more than the strategy's capacity: if the next chunk (frame, reply or summary) would not fit,
the strategy reduces first. Ground-truth assistant turns are never fed. StreamRunner holds one lane's
cache, strategy and pieces (make room, reduce, decode, summarize); the frame loop and the reply steps over
lanes live in frame_loop.py and replies.py; what they share in feed.py.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from prospect.cache import KIND, PositionedCache, Provenance, Records, cache_length, crop_end, keep_spans, recover_provenance
from prospect.context_strategies.base import BaseContextStrategy, ContextOverflowError
from prospect.context_strategies.events import SUMMARY
from prospect.data.types import Conversation, StreamFrame
from prospect.models.static_forward import StaticForward
from prospect.models.vlm import VisionLanguageModel
from prospect.stream.decode import decode_lanes, suppression_bias
from prospect.stream.feed import synchronize
from prospect.stream.frame_record import ConversationResult, FrameRecord
from prospect.stream.frame_loop import stream_lanes
from prospect.stream.settings import StreamSettings, check_reply_fits

log = logging.getLogger(__name__)


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
        self.compile = on_cuda if self.settings.compile == "auto" else bool(self.settings.compile)
        batch = self.settings.vision_batch_size
        self.vision_batch_size = 8 if batch == "auto" else int(batch)  # 8: vision ~2.8 ms/frame on an H200 at +~165 MiB
        vocab = model.model.lm_head.out_features
        self._bias_early = suppression_bias(vocab, model.suppressed_ids + model.stop_ids, model.device)  # before min_new_tokens
        self._bias_late = suppression_bias(vocab, model.suppressed_ids, model.device)
        self.record_queries = bool(strategy.records_queries)  # SnapKV-style scores read them
        self.lane = lane
        self.static = static
        if static is not None:
            self.optimized = True
            if static.capacities[lane] != self.capacity:
                raise ValueError(f"lane {lane} holds {static.capacities[lane]} tokens, strategy {strategy.name} needs {self.capacity}")
            if self.record_queries and not static.record_queries:
                raise ValueError(f"strategy {strategy.name} reads queries: the shared StaticForward must record them")
        elif self.optimized:
            self.static = StaticForward(model, self.capacity, record_queries=self.record_queries, compile=self.compile)

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
        self._generator = torch.Generator(device=self.model.device)  # sampling: reseeded per decode (decode_lanes)
        self._decodes = 0  # decodes (replies, summaries) so far in this conversation
        self.cache = cache
        self._knowledge = ""
        self._conversation = conversation
        self._cache_max = 0
        self._pending: list[int] = []
        self._pending_kind = KIND["system"]
        self._initial_captured = False
        # (prompt, max_new_tokens, summary, cache length before it was asked, after): decoded ahead by summarize_lanes
        self._ready_summary: tuple[str, int, str, int, int] | None = None

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
            "probe": self._probe,
            "frame_index": frame.index,
            "time": frame.time,
            "capacity": self.capacity,
        }

    def _reduce(self, pending: list[int], record: FrameRecord, frame: StreamFrame) -> list[int]:
        """Let the strategy reduce the cache; returns the tokens to feed before the next chunk."""
        synchronize(self.model.device)
        t0 = time.perf_counter()
        before = self._ready_summary[3] if self._ready_summary is not None else cache_length(self.cache)
        cache, last_msg = self.strategy.handle_overflow(self.cache, pending, **self._context(frame))
        if self._ready_summary is not None:  # decoded for this reduction (summarize_lanes), which did not ask for it
            raise RuntimeError(f"strategy {self.strategy.name}: planned_summary() named a summary its reduction did not ask for")
        if cache is not self.cache:
            self._adopt(cache)
        self.cache.check()
        if last_msg and list(last_msg) != list(pending):  # a restart message (summary) replaces what was queued
            self._pending_kind = KIND["summary"] if self.strategy.event == SUMMARY else KIND["system"]
        synchronize(self.model.device)
        record["events"].append(self.strategy.event)
        record.setdefault("reductions", []).append({"before": before, "after": cache_length(self.cache)})
        if self.strategy.event == SUMMARY and self.strategy.last_summary is not None:
            record["summary"] = self.strategy.last_summary
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
            records, next_position = Records(*(t.clone() for t in cache.records)), cache.next_position
        else:  # a plain transformers cache: positions are unknown, so they follow the cache length (seed behaviour)
            own_keys = next(iter(own.layer_tensors()), (None, None))[0]
            labels = recover_provenance(tensors[0][0] if tensors else None, own_keys, own.provenance)
            records, next_position = Records.of(torch.arange(length, dtype=torch.long), labels), length
        for layer in own.layers:
            layer.reset()
        for layer_index, (keys, values) in enumerate(tensors):
            own.update(keys, values, layer_index)
        own.records, own.next_position = records, next_position
        return own

    def _needs_room(self, needed: int) -> bool:
        """Whether `needed` more tokens would not fit: _make_room then reduces."""
        return cache_length(self.cache) + needed > self.capacity

    def _reply_budget(self) -> int:
        """The tokens a reply may add: its prompt, max_new_tokens and its closing."""
        return len(self.prompt_ids) + self.settings.max_new_tokens + len(self.closing_ids)

    def _make_room(self, needed: int, pending: list[int], record: FrameRecord, frame: StreamFrame) -> list[int]:
        """Reduce first when `needed` more tokens would not fit; raise if they still do not fit."""
        if not self._needs_room(needed):
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

    def _probe(self, ids: list[int], measure: Callable[[PositionedCache], Any]) -> Any:
        """Feed `ids` (as assistant tokens) on top of the cache, return measure(cache) while they are cached, and
        remove them again (crop_end): the cache is left as it was (a strategy reads the queries they recorded). None
        when they do not fit."""
        if cache_length(self.cache) + len(ids) > self.capacity:
            return None
        self._forward(ids, kind=KIND["assistant"])
        try:
            return measure(self.cache)
        finally:
            crop_end(self.cache, len(ids))

    def _summary_ids(self, prompt: str) -> list[int]:
        """The tokens that ask for a summary: `prompt` as a system turn, then the assistant prompt."""
        chat = self.model.chat
        return self.model.encode(chat.text_turn("system", prompt) + chat.assistant_prompt)

    def _summary_room(self, ids: list[int]) -> int:
        """The summary tokens that fit after `ids` and the turn's closing."""
        return self.capacity - cache_length(self.cache) - len(ids) - len(self.closing_ids)

    def _summarize(self, prompt: str, max_new_tokens: int) -> str:
        """Ask `prompt` as a system turn on top of the current cache and decode the answer (bounded by room).
        A summary already decoded for this reduction with other lanes' (summarize_lanes) is taken as it is:
        its tokens are in the cache as they would be had it been decoded here."""
        ready, self._ready_summary = self._ready_summary, None
        if ready is not None and ready[:2] == (prompt, max_new_tokens):
            if cache_length(self.cache) != ready[4]:
                raise RuntimeError(f"strategy {self.strategy.name}: the cache changed between the summary decoded for this reduction "
                                   f"and its request (asking for a planned summary must be the reduction's first step on the cache)")
            return ready[2]
        if ready is not None:
            raise RuntimeError(f"strategy {self.strategy.name}: planned_summary() {ready[:2]} differs from the summary asked "
                               f"{(prompt, max_new_tokens)}")
        ids = self._summary_ids(prompt)
        room = self._summary_room(ids)
        if room < 1:
            log.warning("no room left for a summary (cache %d tokens, capacity %d)", cache_length(self.cache), self.capacity)
            return ""
        logits = self._forward(ids, kind=KIND["summary"])
        tokens = self._decode(logits, min(max_new_tokens, room), timing_key="summary_ms", kind=KIND["summary"])
        self._timing["summary_tokens"] = self._timing.get("summary_tokens", 0) + len(tokens)
        return self.model.decode(tokens)
