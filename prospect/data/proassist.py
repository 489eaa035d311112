"""Reader of ProAssist's prepared data: `{root}/processed_data/{subset}/prepared/{annotation}.jsonl`.

Each JSON line is one (video, user type) sample; its `conversation` lists system/user/assistant turns
and `frames` turns (`start`/`end` frame indices, end exclusive). The stream ProAssist builds from it:
every frame of every `frames` turn in order; system/user turns are fed as text before the next frame;
a frame carries a reference when it is the last frame of a `frames` turn that an assistant turn
follows (the reference is that turn's content). Assistant turns are never fed. Like ProAssist's
evaluation, a conversation ends at its first "Please summarize..." system turn (summary training
turns). With knowledge (dialog-klg_* files) ProAssist puts a "Task knowledge: ..." system turn right
after the first user turn; it is fed like any other system turn.
"""

from __future__ import annotations

import codecs
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from prospect.data.frames import FrameError, FrameSource, ImageListSource
from prospect.data.types import Conversation, StreamFrame, Turn

log = logging.getLogger(__name__)

PROASSIST_SUBSETS = ("ego4d", "holoassist", "epickitchens", "egoexolearn", "wtag", "assembly101")
SUMMARY_QUERY_PREFIX = "Please summarize"
REQUIRED_FIELDS = ("video_uid", "frames_file", "start_frame_idx", "end_frame_idx", "fps", "conversation")


class DatasetError(ValueError):
    """The dataset as a whole cannot be read (missing folder or annotation file)."""


class SampleError(ValueError):
    """One sample cannot be turned into a stream; the message names the file, line and video."""


@dataclass
class SkippedSample:
    line: int
    video_uid: str | None
    reason: str


@dataclass
class LoadedDataset:
    conversations: list[Conversation]
    skipped: list[SkippedSample] = field(default_factory=list)


def subset_dir(root: str | Path, subset: str) -> Path:
    return Path(root).expanduser() / "processed_data" / subset


def annotation_path(root: str | Path, subset: str, annotation: str) -> Path:
    return subset_dir(root, subset) / "prepared" / f"{annotation}.jsonl"


def available_annotations(root: str | Path, subset: str) -> list[str]:
    folder = subset_dir(root, subset) / "prepared"
    return sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def available_subsets(root: str | Path) -> list[str]:
    folder = Path(root).expanduser() / "processed_data"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def load_conversations(
    root: str | Path,
    subset: str,
    annotation: str,
    video_ids: Iterable[str] | None = None,
    max_videos: int | None = None,
    user_types: Iterable[str] | None = None,
) -> LoadedDataset:
    """Read every sample of one annotation file into conversations (frames stay undecoded).

    A line that cannot be used (not UTF-8, malformed JSON, not a JSON object, a required field missing
    or of the wrong type, missing frames file, end_frame_idx past the video, bad turns) is skipped and
    reported in `skipped` and by one warning naming file:line (and the video when known); the others
    still load. Lines are read as bytes and decoded one by one. `video_ids` keeps only
    those videos; `max_videos` keeps the first N distinct videos; `user_types` keeps those user types.

    Conversation ids (`video_uid/clip_idx/user_id`) are unique: a line identical to an earlier one (the same
    JSON object) is skipped (`FILE:LINE: duplicate of line K, skipped`); a line whose id an earlier, different
    line already has is kept as `ID#lineN` (N its line), with a warning.
    """
    path = annotation_path(root, subset, annotation)
    if not path.is_file():
        choices = ", ".join(available_annotations(root, subset)) or "none found"
        raise DatasetError(f"{path}: annotation file missing (available in {path.parent}: {choices})")
    wanted = set(video_ids) if video_ids is not None else None
    sources: dict[Path, FrameSource] = {}
    kept_videos: list[str] = []
    loaded = LoadedDataset(conversations=[])
    first_line_of: dict[str, int] = {}  # a loaded sample's canonical JSON -> its line
    with path.open("rb") as lines:  # bytes: one line that is not UTF-8 must not stop the others
        parsed = [(line_number, *_parse_line(raw)) for line_number, raw in enumerate(lines, start=1)]
    ids = _distinct_ids(parsed)
    for line_number, sample, problem in parsed:
        where = f"{path}:{line_number}"
        if sample is None and problem is None:
            continue  # blank line
        video_uid = _known_video_uid(sample)
        if wanted is not None and video_uid is not None and video_uid not in wanted:
            continue  # another video's line, broken or not; a line whose video is unknown is reported
        if problem is None:
            try:
                check_sample_fields(sample)
            except SampleError as error:
                problem = str(error)
        if problem is not None:
            loaded.skipped.append(SkippedSample(line_number, video_uid, f"{where}: {_naming(video_uid, problem)}"))
            continue
        if user_types is not None and ((sample.get("metadata") or {}).get("user_type") not in set(user_types)):
            continue
        if video_uid not in kept_videos:
            if max_videos is not None and len(kept_videos) >= max_videos:
                continue
        canonical = _canonical(sample)
        if canonical in first_line_of:  # the same sample twice (concatenated splits, a preparation run twice)
            reason = f"{where}: duplicate of line {first_line_of[canonical]}, skipped"
            loaded.skipped.append(SkippedSample(line_number, video_uid, reason))
            continue
        try:
            conversation = conversation_from_sample(sample, subset_dir(root, subset), sources)
        except (SampleError, FrameError) as error:
            loaded.skipped.append(SkippedSample(line_number, video_uid, f"{where}: {error}"))
            continue
        first_line_of[canonical] = line_number
        distinct, first = ids.get(line_number, (conversation.id, None))
        if first is not None:  # same (video_uid, clip_idx, user id) as an earlier line, other content: both are kept
            log.warning("%s: video %s: id %s also names line %d, whose sample differs; this one is streamed as %s",
                        where, video_uid, conversation.id, first, distinct)
            conversation.id = distinct
        if video_uid not in kept_videos:
            kept_videos.append(video_uid)
        loaded.conversations.append(conversation)
    for skipped in loaded.skipped:
        log.warning("skipped sample: %s", skipped.reason)
    return loaded


def _canonical(sample: Any) -> str:
    """A sample as one JSON text whatever its key order or spacing: equal texts, the same sample."""
    return json.dumps(sample, sort_keys=True, ensure_ascii=False)


def sample_id(sample: dict) -> str:
    """A sample's conversation id: `video_uid/clip_idx/user_id` (the user type when there is no user id)."""
    metadata = sample.get("metadata") or {}
    user_id = metadata.get("user_id") or metadata.get("user_type") or "unknown"
    return f"{sample['video_uid']}/{sample.get('clip_idx', 0)}/{user_id}"


def _distinct_ids(parsed: list[tuple[int, Any, str | None]]) -> dict[int, tuple[str, int | None]]:
    """{line: (its conversation id, the earlier line whose different sample has the same id, or None)}, over the
    whole file (so the ids do not depend on the filters): the first sample with an id keeps it; a later,
    different one becomes `ID#lineN` (N its line; `-2`, `-3`, ... appended should the file use that id too)."""
    found = {}
    for line_number, sample, problem in parsed:
        if problem is None and sample is not None:
            try:
                check_sample_fields(sample)  # a line skipped as broken claims no id
            except SampleError:
                continue
            found[line_number] = (sample_id(sample), _canonical(sample))
    taken = {base for base, _ in found.values()}
    first_of: dict[str, tuple[int, str]] = {}
    ids: dict[int, tuple[str, int | None]] = {}
    for line_number, (base, canonical) in found.items():
        first_line, first_canonical = first_of.setdefault(base, (line_number, canonical))
        if canonical == first_canonical:  # the first, or a copy of it (skipped as a duplicate)
            ids[line_number] = (base, None)
            continue
        distinct, count = f"{base}#line{line_number}", 1
        while distinct in taken:
            count += 1
            distinct = f"{base}#line{line_number}-{count}"
        taken.add(distinct)
        ids[line_number] = (distinct, first_line)
    return ids


def _parse_line(raw: bytes) -> tuple[Any, str | None]:
    """(sample, None), (None, None) for a blank line, or (None or a best-effort sample, problem)."""
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark an editor put in front is not data
    except UnicodeDecodeError as error:
        # skipped, but parsed with replacement characters where possible so the message can name the video
        try:
            guess = json.loads(raw.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):
            guess = None
        offset = error.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)  # -sig counts after the mark
        return guess, f"not UTF-8 text (invalid byte 0x{raw[offset]:02x} at byte offset {offset})"
    if not text.strip():
        return None, None
    try:
        return json.loads(text), None
    except json.JSONDecodeError as error:
        return None, f"malformed JSON ({error.msg})"
    except RecursionError:
        return None, "malformed JSON (nested too deeply)"
    except ValueError as error:  # e.g. an integer past Python's digit limit
        return None, f"malformed JSON ({error})"
    except RecursionError:
        return None, "malformed JSON (nested too deeply)"


def _known_video_uid(sample: Any) -> str | None:
    video_uid = sample.get("video_uid") if isinstance(sample, dict) else None
    return video_uid if isinstance(video_uid, str) and video_uid else None


def _naming(video_uid: str | None, problem: str) -> str:
    """The problem, with the video in front when it is known and not already named."""
    if video_uid is None or problem.startswith(f"video {video_uid}:"):
        return problem
    return f"video {video_uid}: {problem}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sample_fields(sample: Any) -> None:
    """Raise SampleError unless `sample` is a JSON object with every required field of the right type."""
    if not isinstance(sample, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(type(sample), "null")
        raise SampleError(f"not a JSON object (got {kind})")
    video_uid = _known_video_uid(sample)
    missing = [key for key in REQUIRED_FIELDS if key not in sample]
    if missing:
        raise SampleError(_naming(video_uid, f"missing field(s) {', '.join(missing)}"))
    wrong = []
    if video_uid is None:
        wrong.append(f"video_uid must be a non-empty string, got {sample['video_uid']!r}")
    if not isinstance(sample["frames_file"], str) or not sample["frames_file"]:
        wrong.append(f"frames_file must be a non-empty string, got {sample['frames_file']!r}")
    start, end = sample["start_frame_idx"], sample["end_frame_idx"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)) or not 0 <= start < end:
        wrong.append(f"bad frame range start_frame_idx={start!r} end_frame_idx={end!r}")
    fps = sample["fps"]
    if not _is_number(fps) or not 0 < fps < float("inf"):
        wrong.append(f"fps must be a positive number, got {fps!r}")
    turns = sample["conversation"]
    if not isinstance(turns, list) or not turns:
        wrong.append(f"'conversation' must be a non-empty list of turns, got {type(turns).__name__}")
    metadata = sample.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        wrong.append(f"metadata must be an object, got {type(metadata).__name__}")
    elif metadata:
        for key in ("user_type", "user_id", "task_goal", "knowledge"):
            if metadata.get(key) is not None and not isinstance(metadata[key], str):
                wrong.append(f"metadata.{key} must be a string, got {type(metadata[key]).__name__}")
        if metadata.get("add_knowledge") is not None and not isinstance(metadata["add_knowledge"], bool):
            wrong.append(f"metadata.add_knowledge must be true or false, got {metadata['add_knowledge']!r}")
    if sample.get("dataset") is not None and not isinstance(sample["dataset"], str):
        wrong.append(f"dataset must be a string, got {type(sample['dataset']).__name__}")
    if wrong:
        raise SampleError(_naming(video_uid, "; ".join(wrong)))


def conversation_from_sample(
    sample: Any, subset_folder: Path, sources: dict[Path, FrameSource] | None = None
) -> Conversation:
    """Build the stream of one prepared sample. `sources` shares frame files between user types."""
    check_sample_fields(sample)
    video_uid = sample["video_uid"]
    metadata = sample.get("metadata") or {}
    start, end, fps = sample["start_frame_idx"], sample["end_frame_idx"], float(sample["fps"])

    frames_path = subset_folder / sample["frames_file"]
    if sources is None:
        sources = {}
    if frames_path not in sources:
        sources[frames_path] = FrameSource(frames_path, video_uid)
    source = sources[frames_path]
    if end > len(source):
        raise SampleError(f"video {video_uid}: end_frame_idx {end} past the video ({frames_path} has {len(source)} frames)")

    system_parts, frames = _stream_from_turns(sample["conversation"], start, end, fps, video_uid)
    user_type = metadata.get("user_type") or "unknown"
    return Conversation(
        id=sample_id(sample),
        video_uid=video_uid,
        subset=sample.get("dataset") or subset_folder.name,
        user_type=user_type,
        fps=fps,
        system_prompt="\n".join(system_parts),
        task_goal=metadata.get("task_goal") or "",
        knowledge=metadata.get("knowledge") or "",
        add_knowledge=bool(metadata.get("add_knowledge", False)),
        frames=frames,
        frame_source=source,
    )


def _stream_from_turns(
    turns: Any, start: int, end: int, fps: float, video_uid: str
) -> tuple[list[str], list[StreamFrame]]:
    if not isinstance(turns, list) or not turns:
        raise SampleError(f"video {video_uid}: 'conversation' must be a non-empty list of turns")
    system_parts: list[str] = []
    pending: list[Turn] = []
    frames: list[StreamFrame] = []
    for position, turn in enumerate(turns):
        role = turn.get("role") if isinstance(turn, dict) else None
        if role == "frames":
            first, stop = turn.get("start"), turn.get("end")
            if not (isinstance(first, int) and isinstance(stop, int) and start <= first < stop <= end):
                raise SampleError(
                    f"video {video_uid}: turn {position} frames [{first}, {stop}) outside the clip [{start}, {end})"
                )
            following = turns[position + 1] if position + 1 < len(turns) else None
            reference = following.get("content") if isinstance(following, dict) and following.get("role") == "assistant" else None
            if reference is not None and not isinstance(reference, str):
                raise SampleError(f"video {video_uid}: turn {position + 1} (assistant) content must be a string, got {type(reference).__name__}")
            for original_index in range(first, stop):
                k = len(frames)
                frames.append(
                    StreamFrame(
                        index=k,
                        original_index=original_index,
                        time=(k + 1) / fps,
                        turns_before=tuple(pending),
                        reference=reference if original_index == stop - 1 else None,
                    )
                )
                pending = []
        elif role in ("system", "user"):
            content = turn.get("content")
            if not isinstance(content, str):
                raise SampleError(f"video {video_uid}: turn {position} ({role}) has no text content")
            if role == "system" and content.startswith(SUMMARY_QUERY_PREFIX):
                break
            if role == "system" and not frames:
                system_parts.append(content)
            else:
                pending.append(Turn(role=role, content=content, time=turn.get("time")))
        elif role == "assistant":
            continue  # ground truth: attached to the frame before it, never fed
        else:
            raise SampleError(f"video {video_uid}: turn {position} has unknown role {role!r}")
    if not frames:
        raise SampleError(f"video {video_uid}: the conversation has no frames turn")
    return system_parts, frames


def timed_turns_to_prepared(turns: list[dict], fps: float, num_frames: int) -> list[dict]:
    """Timestamped turns ({role, content, time}) -> ProAssist's prepared form [frames, turn, frames, ...].

    As ProAssist's preparation: a turn at time t follows the frames up to floor(t * fps) (exclusive),
    moved one frame later when that would leave an empty frames turn; system turns without a time
    go first. The frames after the last turn end the stream, so every one of the `num_frames` frames
    is streamed. Turns at or past the end of the frames have no frame to follow and are dropped (with
    a warning).
    """
    prepared = [t for t in turns if t.get("role") == "system" and t.get("time") is None]
    timed = [t for t in turns if not (t.get("role") == "system" and t.get("time") is None)]
    cursor = 0
    for position, turn in enumerate(timed):
        if not _is_number(turn.get("time")):
            raise SampleError(f"turn {turn.get('role')!r} {str(turn.get('content'))[:40]!r} needs a time in seconds, got {turn.get('time')!r}")
        index = max(int(float(turn["time"]) * fps), cursor + 1)
        if index > num_frames:  # a turn at the end of the last frame still follows it
            log.warning(
                "%d turn(s) from time %ss on dropped: past the %d frames given (%.1f s at %g fps)",
                len(timed) - position, turn["time"], num_frames, num_frames / fps, fps,
            )
            break
        prepared.append({"role": "frames", "start": cursor, "end": index})
        prepared.append(turn)
        cursor = index
    if cursor < num_frames:
        prepared.append({"role": "frames", "start": cursor, "end": num_frames})
    return prepared


def with_unique_ids(conversations: list[Conversation]) -> list[Conversation]:
    """The conversations, a repeated id made unique as `ID#N` (its N-th occurrence, N >= 2) with a warning:
    predictions.json, evaluation and paired comparisons key conversations by id."""
    taken = {conversation.id for conversation in conversations}
    seen: dict[str, int] = {}
    for index, conversation in enumerate(conversations):
        count = seen[conversation.id] = seen.get(conversation.id, 0) + 1
        if count > 1:
            distinct = f"{conversation.id}#{count}"
            while distinct in taken:  # the list uses that id already
                count += 1
                distinct = f"{conversation.id}#{count}"
            taken.add(distinct)
            log.warning("conversation %d: id %s repeats an earlier conversation's; it is kept as %s", index, conversation.id, distinct)
            conversations[index] = replace(conversation, id=distinct)
    return conversations


def conversation_from_images(video_uid: str, images: list, turns: list[dict], fps: float, user_type: str = "unknown") -> Conversation:
    """A conversation over in-memory frames; `turns` are ProAssist prepared turns or timestamped turns.

    With timestamped turns every image is streamed, the ones after the last turn included; with
    prepared turns the `frames` turns choose the frames."""
    if not any(t.get("role") == "frames" for t in turns):
        try:
            turns = timed_turns_to_prepared(turns, fps, len(images))
        except SampleError as error:
            raise SampleError(f"video {video_uid}: {error}") from None
    spans = [(t["start"], t["end"]) for t in turns if t.get("role") == "frames"]
    if not spans:
        raise SampleError(f"video {video_uid}: no frames to stream ({len(images)} images given)")
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    system_parts, frames = _stream_from_turns(turns, start, end, fps, video_uid)
    return Conversation(
        id=f"{video_uid}/0/{user_type}",
        video_uid=video_uid,
        subset="custom",
        user_type=user_type,
        fps=fps,
        system_prompt="\n".join(system_parts),
        task_goal="",
        knowledge="",
        add_knowledge=False,
        frames=frames,
        frame_source=ImageListSource(images, video_uid),
    )
