"""A job's files in its output folder: what they are called, how they are written (atomically, or streamed
frame by frame), and what an interrupted conversation leaves in them. docs/stream.md describes each file.

A full disk (prospect.signals.DISK_FULL_ERRNOS) never leaves a broken file: an atomic write that fails
leaves the file it replaces as it was and no temporary file, trace.jsonl is cut back to its last complete
line, and prospect.signals.DiskFull is raised, naming the file.

Light on purpose (no torch): the sweep's result cache and summary write and read these files too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from prospect.signals import DiskFull, Stopped, is_disk_full
from prospect.stream.frame_record import PREDICTIONS_SCHEMA, SPEAK_FIELD, ConversationResult, FrameRecord

log = logging.getLogger(__name__)

OUTPUT_FILES = ("results.json", "predictions.json", "trace.jsonl", "timeline.html", "cache_sizes.png")


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(staging)` into PATH.tmp, then rename it over `path`: a crash never leaves half a file. When
    anything fails, the temporary file is removed and `path` is left as it was; a full disk raises DiskFull
    naming `path`, any other error is raised as it is."""
    path = Path(path)
    staging = path.with_name(path.name + ".tmp")
    try:
        write(staging)
        os.replace(staging, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            staging.unlink(missing_ok=True)
        if is_disk_full(error):
            raise DiskFull.of(error, path) from None
        raise


def write_json(path: Path, document: Any) -> None:
    """Write atomically (replace_atomically: a crash or a full disk never leaves half a file)."""
    text = json.dumps(document, indent=1, ensure_ascii=False, default=str) + "\n"
    replace_atomically(path, lambda staging: staging.write_text(text, encoding="utf-8"))


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
    reason = str(error) if isinstance(error, Stopped) else f"interrupted ({type(error).__name__})"
    result.error = f"{reason}; partial: {len(result.trace)} of {result.conversation.num_frames} frames streamed"


class JobFiles:
    """A job's streamed outputs: trace.jsonl gets each frame's record as soon as the frame is processed
    (written straight to the file, unbuffered) and `on_record(record)` follows (the W&B mirror);
    predictions.json is rewritten after each conversation, and when anything stops the stream with the
    replies of the conversation in progress, marked partial.

    A record the disk has no room for is not left half written: trace.jsonl is cut back to the end of its
    last complete line, the frame is taken out of its conversation's result too (so results.json and
    predictions.json count the frames the trace holds), and DiskFull is raised."""

    def __init__(self, output_dir: Path, results: list[ConversationResult], on_record: Callable[[FrameRecord], None] | None = None):
        self.output_dir, self.results, self.on_record = output_dir, results, on_record
        self.trace_path = output_dir / "trace.jsonl"
        self.trace = self.trace_path.open("wb", buffering=0)
        self.complete = 0  # bytes of trace.jsonl up to the end of its last complete line

    def record(self, record: FrameRecord) -> None:
        line = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        try:
            while line:  # a raw write may write part of the line: write the rest, or fail
                line = line[self.trace.write(line):]
        except OSError as error:
            self._cut_back()
            if not is_disk_full(error):
                raise
            self._forget(record)
            raise DiskFull.of(error, self.trace_path) from None
        self.complete = self.trace.tell()
        if self.on_record is not None:
            self.on_record(record)

    def _cut_back(self) -> None:
        """Truncate trace.jsonl to its last complete line (shrinking a file needs no room)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self.trace.fileno(), self.complete)
            self.trace.seek(self.complete)

    def _forget(self, record: FrameRecord) -> None:
        """Take the frame whose record could not be written out of its conversation's result (its reply too)."""
        for result in reversed(self.results):  # several conversations stream at once with conversation_batch > 1
            if result.trace and result.trace[-1] is record:
                result.trace.pop()
                result.finished = False
                if "reply" in record:
                    result.replies.pop(record["index"], None)
                return

    def predictions(self) -> None:
        write_json(self.output_dir / "predictions.json", predictions_document(self.results))

    def conversation_done(self, result: ConversationResult) -> None:
        self.predictions()
        for index, reply in sorted(result.replies.items()):
            log.info("%s @%.1fs: %s", result.conversation.id, result.conversation.frames[index].time, reply)

    def stopped(self, result: ConversationResult, error: BaseException, peak_memory_mb: Callable[[], float] | None = None) -> None:
        """The stream stopped inside `result`'s conversation: mark it partial and write the predictions
        (DiskFull when they cannot be written)."""
        mark_partial(result, error)
        if peak_memory_mb is not None and not result.peak_memory_mb:
            try:
                result.peak_memory_mb = peak_memory_mb()
            except Exception:  # a courtesy figure: never cost the files
                pass
        self.predictions()

    def close(self) -> None:
        self.trace.close()  # unbuffered: nothing left to write, closing cannot fail for lack of room
