"""The per-frame trace record, the stream's main data contract, and what one conversation produced.

The stream (prospect/stream/runner.py, `stream_lanes`) writes one `FrameRecord` per fed frame; trace.jsonl
holds them one JSON object a line, in the order the keys were set. The oracle writes the few keys it has.
Readers (tracking/, eval/, the W&B mirror) read them as this type. docs/stream.md describes the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

from prospect.data.types import Conversation

# the record's timings (ms, CUDA-synchronized): they differ between runs that compute the same thing
TIMING_FIELDS = ("vision_ms", "frame_prefill_ms", "prefill_ms", "decode_ms", "reduce_ms", "summary_ms", "probe_ms", "score_ms", "wall_ms")
TURN_FIELDS = ("ref_nll", "ref_tokens", "ref_top1", "ref_truncated")  # a scored reference's fields, also in predictions.json
PREDICTIONS_SCHEMA = "prospect.predictions/1"  # predictions.json's "schema" (prospect/tracking/job_files.py writes it)
SPEAK_FIELD = "speak_probability"  # predictions.json: {"index": [...], "p": [...], "due": [...]} per conversation


class Reduction(TypedDict):
    before: int  # tokens in the cache before the strategy reduced it
    after: int  # ... and after


class FrameRecord(TypedDict, total=False):
    """One fed frame. Token counts are tokens, times seconds, timings milliseconds, probabilities in [0, 1]."""

    conversation: str  # the conversation's id
    index: int  # the frame's stream index
    time: float  # seconds from the clip start
    cache_before: int  # tokens cached before the frame step
    events: list[str]  # "frame", "speak" and the strategy's reduction events (prospect.context_strategies.events)
    reference_due: bool  # a reference reply is due at this frame (gt_turns speaks here)
    reductions: list[Reduction]  # one per reduction during this frame step
    summary: str  # summarize_and_drop: the summary decoded at this frame
    chunk_tokens: int  # tokens of the frame chunk (pending restart text, turns due, the frame)
    speak_probability: float  # 1 - P(end of turn first) at the assistant prompt (the threshold-free timing score)
    not_talk_probability: float  # threshold policy: the probability that decided to stay silent or speak
    ref_nll: float  # summed NLL of the due reference reply, teacher-forced under this cache (nats)
    ref_tokens: int  # its tokens
    ref_top1: float  # the share of its tokens that were the model's top-1 choice
    ref_truncated: bool  # the reference was longer than the room left in the cache
    reply: str  # what the model said
    generated_tokens: int  # tokens of the reply (0 when silent)
    vision_ms: float
    frame_prefill_ms: float
    prefill_ms: float
    decode_ms: float
    reduce_ms: float
    summary_ms: float
    probe_ms: float
    score_ms: float
    cache_after: int  # tokens cached after the frame step (and any reduction)
    cache_frame_tokens: int | float  # of which image and frame_text tokens (per-head cache: mean over layers and KV heads)
    cache_frame_tokens_range: list[int]  # per-head cache only: [min, max] of those over layers and KV heads
    cache_dialogue_tokens: int | float  # of which every other kind
    cache_max: int  # the most tokens held during this frame step
    next_position: int  # the position the next token gets
    pending_tokens: int  # restart text queued for the next chunk
    wall_ms: float  # the frame step's wall time; a step that fed several conversations (conversation_batch): its share


@dataclass
class ConversationResult:
    """What one conversation produced; filled frame by frame, so a failure keeps what was computed."""

    conversation: Conversation
    replies: dict[int, str] = field(default_factory=dict)  # stream index -> generated text
    trace: list[FrameRecord] = field(default_factory=list)  # one record per processed frame
    peak_memory_mb: float = 0.0
    wall_s: float = 0.0
    error: str | None = None
    partial: dict | None = None  # cut short by a stop signal: {"frames_streamed", "stopped_at": {"index", "time"} | None}
    finished: bool = False  # every frame to feed was streamed (a stop signal in a batch's later steps leaves it whole)

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
