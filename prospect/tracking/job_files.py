"""A job's files in its output folder: what they are called, how they are written (atomically, or streamed
frame by frame), and what an interrupted conversation leaves in them. docs/stream.md describes each file.

Light on purpose (no torch): the sweep's result cache and summary write and read these files too.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from prospect.signals import Interrupted
from prospect.stream.frame_record import PREDICTIONS_SCHEMA, SPEAK_FIELD, ConversationResult, FrameRecord

log = logging.getLogger(__name__)

OUTPUT_FILES = ("results.json", "predictions.json", "trace.jsonl", "timeline.html", "cache_sizes.png")


def write_json(path: Path, document: Any) -> None:
    """Write atomically (a crash never leaves half a file)."""
    staging = path.with_suffix(path.suffix + ".tmp")
    staging.write_text(json.dumps(document, indent=1, ensure_ascii=False, default=str) + "\n")
    os.replace(staging, path)


def predictions_document(results: Sequence[ConversationResult]) -> dict:
    """predictions.json: per conversation, the frames where the model spoke or a reference exists."""
    conversations = []
    for result in results:
        c = result.conversation
        entry = {
            "id": c.id,
            "video_uid": c.video_uid,
            "subset": c.subset,
            "user_type": c.user_type,
            "fps": c.fps,
            "num_frames": c.num_frames,
            "frames": result.prediction_frames(),
        }
        speak = result.speak_probabilities()
        if speak is not None:
            entry[SPEAK_FIELD] = speak
        if result.error:
            entry["error"] = result.error
        if result.partial:  # interrupted: the replies up to the frame it stopped at (skipped by evaluation: error)
            entry["partial"] = True
            entry.update(result.partial)
        conversations.append(entry)
    return {"schema": PREDICTIONS_SCHEMA, "conversations": conversations}


def mark_partial(result: ConversationResult, error: BaseException) -> None:
    """Mark the conversation in progress as cut short by `error`: what was streamed stays."""
    last = result.trace[-1] if result.trace else None
    result.partial = {
        "frames_streamed": len(result.trace),
        "stopped_at": None if last is None else {"index": last["index"], "time": last["time"]},
    }
    reason = str(error) if isinstance(error, Interrupted) else f"interrupted ({type(error).__name__})"
    result.error = f"{reason}; partial: {len(result.trace)} of {result.conversation.num_frames} frames streamed"


class JobFiles:
    """A job's streamed outputs: trace.jsonl gets each frame's record as soon as the frame is processed
    (appended and flushed) and `on_record(record)` follows (the W&B mirror); predictions.json is rewritten
    after each conversation, and when anything stops the stream with the replies of the conversation in
    progress, marked partial."""

    def __init__(self, output_dir: Path, results: list[ConversationResult], on_record: Callable[[FrameRecord], None] | None = None):
        self.output_dir, self.results, self.on_record = output_dir, results, on_record
        self.trace = (output_dir / "trace.jsonl").open("w", encoding="utf-8")

    def record(self, record: FrameRecord) -> None:
        self.trace.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.trace.flush()
        if self.on_record is not None:
            self.on_record(record)

    def predictions(self) -> None:
        write_json(self.output_dir / "predictions.json", predictions_document(self.results))

    def conversation_done(self, result: ConversationResult) -> None:
        self.predictions()
        for index, reply in sorted(result.replies.items()):
            log.info("%s @%.1fs: %s", result.conversation.id, result.conversation.frames[index].time, reply)

    def stopped(self, result: ConversationResult, error: BaseException, peak_memory_mb: Callable[[], float] | None = None) -> None:
        """The stream stopped inside `result`'s conversation: mark it partial and write the predictions."""
        mark_partial(result, error)
        if peak_memory_mb is not None and not result.peak_memory_mb:
            try:
                result.peak_memory_mb = peak_memory_mb()
            except Exception:  # a courtesy figure: never cost the files
                pass
        self.predictions()

    def close(self) -> None:
        self.trace.close()
