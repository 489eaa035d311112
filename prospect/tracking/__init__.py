"""Tracking: the W&B mirror of a run's local files, a reader for offline `.wandb` logs, and the cache-size
plot and HTML timeline built from trace.jsonl and predictions.json.

Shared here: how trace records (prospect/stream/frame_record.py) name and carry cache reductions.
"""

from __future__ import annotations

from collections.abc import Iterable

from prospect.context_strategies.events import REDUCTION_EVENTS
from prospect.stream.frame_record import FrameRecord


def reductions(record: FrameRecord) -> list[tuple[str, int, int]]:
    """(event, tokens before, tokens after) for each cache reduction of one trace record, in order.

    The runner appends one strategy event and one {before, after} entry per reduction; a record without
    "reductions" falls back to the frame's cache_before/cache_after.
    """
    events = [event for event in record.get("events", []) if event in REDUCTION_EVENTS]
    sizes = record.get("reductions") or []
    fallback = {"before": record.get("cache_before", 0), "after": record.get("cache_after", 0)}
    result = []
    for i, event in enumerate(events):
        size = sizes[i] if i < len(sizes) else fallback
        result.append((event, int(size["before"]), int(size["after"])))
    return result


def by_conversation(records: Iterable[FrameRecord]) -> dict[str, list[FrameRecord]]:
    """Trace records grouped by conversation id, in first-seen order (records keep their order)."""
    groups: dict[str, list[FrameRecord]] = {}
    for record in records:
        groups.setdefault(str(record.get("conversation", "")), []).append(record)
    return groups
