"""Cache size over time from trace records (one line per conversation, reductions marked)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prospect.stream.frame_record import FrameRecord
from prospect.context_strategies.events import REDUCTION_EVENTS
from prospect.tracking import by_conversation, reductions
from prospect.tracking.job_files import replace_atomically

EVENT_COLOURS = {"compress": "#ff7f0e", "reset": "#d62728", "summary": "#2ca02c"}  # one per reduction event
EVENT_MARKERS = {"compress": "v", "reset": "x", "summary": "s"}
MAX_LEGEND_CONVERSATIONS = 8  # more conversations than this: lines stay unlabelled


def cache_curve(records: Iterable[FrameRecord]) -> list[tuple[float, int]]:
    """(time s, cache tokens) points of one conversation: per frame, the most tokens held during the step
    (`cache_max`, else the size before its reductions) when above the size after it, then the size after
    it, so a reduction shows as a vertical drop."""
    points = []
    for record in records:
        peak = max([record.get("cache_max", 0)] + [before for _, before, _ in reductions(record)])
        if peak > record["cache_after"]:
            points.append((record["time"], peak))
        points.append((record["time"], record["cache_after"]))
    return points


def plot_cache_sizes(path_png: str | Path, records: Iterable[FrameRecord], title: str, max_seq_len: int | None = None) -> Path:
    """Write a PNG of cache length (tokens) against stream time (s) per conversation, with compressions,
    resets and summaries marked and an optional max_seq_len line (atomically: DiskFull when the disk has no
    room). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy, with the next: matplotlib costs ~0.5 s, only when a figure is drawn
    from matplotlib.figure import Figure

    groups = by_conversation(records)
    figure = Figure(figsize=(10, 4.5), dpi=110)  # Agg canvas, no pyplot: no display, no global backend change
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    label_lines = len(groups) <= MAX_LEGEND_CONVERSATIONS
    marks: dict[str, list[tuple[float, int, int]]] = {event: [] for event in REDUCTION_EVENTS}
    for conversation, rows in groups.items():
        times, sizes = zip(*cache_curve(rows))
        axes.plot(times, sizes, linewidth=1.2, label=conversation if label_lines else None)
        for record in rows:
            for event, before, after in reductions(record):
                marks[event].append((record["time"], before, after))
    for event, points in marks.items():
        if points:
            times, befores, afters = zip(*points)
            axes.vlines(times, afters, befores, colors=EVENT_COLOURS[event], linewidth=0.8, alpha=0.6)
            axes.scatter(
                times, befores, marker=EVENT_MARKERS[event], color=EVENT_COLOURS[event], s=22, zorder=3, label=f"{event} ({len(points)})"
            )
    if max_seq_len:
        axes.axhline(max_seq_len, color="black", linestyle="--", linewidth=0.9, label=f"max_seq_len {max_seq_len}")
    axes.set_xlabel("stream time (s)")
    axes.set_ylabel("KV cache length (tokens)")
    axes.set_title(title)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    path_png = Path(path_png)
    replace_atomically(path_png, lambda staging: figure.savefig(staging, format="png"))  # a full disk leaves no half a PNG
    return path_png
