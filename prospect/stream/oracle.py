"""The oracle: replies are the reference texts at the reference frames, no model. A pipeline sanity check:
with default evaluation settings it must score F1 = 1.0."""

from __future__ import annotations

import time

from prospect.data.types import Conversation
from prospect.stream.frame_record import ConversationResult, FrameRecord


class OracleRunner:
    """Same interface as StreamRunner.run; the cache stays empty."""

    def run(self, conversation: Conversation, result: ConversationResult | None = None, progress: bool = False) -> ConversationResult:
        result = result or ConversationResult(conversation)
        started = time.perf_counter()
        for frame in conversation.frames:
            t0 = time.perf_counter()
            events = ["frame"]
            if frame.reference:
                result.replies[frame.index] = frame.reference
                events.append("speak")
            result.trace.append(FrameRecord(
                conversation=conversation.id, index=frame.index, time=frame.time, cache_before=0, cache_after=0, cache_max=0,
                next_position=0, events=events, chunk_tokens=0, generated_tokens=0, reply=frame.reference,
                wall_ms=(time.perf_counter() - t0) * 1000,
            ))
        result.wall_s = time.perf_counter() - started
        return result
