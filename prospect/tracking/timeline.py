"""timeline.html: a self-contained page (inline CSS and SVG, no script, no external resource) showing,
per conversation, the reference and generated turns on a time axis, the KV cache length under it with
reductions marked, and the turns as a table. Hover a mark for its text."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prospect.stream.frame_record import FrameRecord
from prospect.context_strategies.events import REDUCTION_EVENTS
from prospect.tracking import by_conversation, reductions
from prospect.tracking.job_files import replace_atomically
from prospect.tracking.plots import EVENT_COLOURS, cache_curve

WIDTH, LEFT, RIGHT = 960, 96, 16  # svg px
REF_Y, GEN_Y, LANE_H = 14, 40, 16  # lane tops and height
CHART_TOP, CHART_H = 78, 120  # cache chart
HEIGHT = CHART_TOP + CHART_H + 30
REF_COLOUR, GEN_COLOUR, CURVE_COLOUR = "#7b61a8", "#1f77b4", "#333333"

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1000px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 4px; }
.meta { color: #555; margin: 0 0 8px; } .error { color: #b00020; }
.legend span { display: inline-block; margin-right: 14px; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; vertical-align: middle; }
svg { display: block; } svg text { font-size: 11px; fill: #444; }
.turn:hover, .reduction:hover { opacity: 0.6; }
table { border-collapse: collapse; width: 100%; margin-top: 6px; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
td.time { white-space: nowrap; color: #555; width: 4em; } td.gen { color: #1f4f7a; }
details summary { cursor: pointer; color: #555; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def nice_step(span: float, max_ticks: int = 10) -> float:
    """The smallest 1/2/5 x 10^k step giving at most `max_ticks` ticks over `span`."""
    if span <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(span / max_ticks))
    for factor in (1, 2, 5, 10):
        if span / (factor * power) <= max_ticks:
            return factor * power
    return 10 * power


def _simplify(points: list[tuple[float, float]], tolerance: float = 0.25) -> list[tuple[float, float]]:
    """Drop points lying (within `tolerance` px) on the segment between their kept neighbours."""
    kept: list[tuple[float, float]] = []
    for point in points:
        while len(kept) >= 2:
            (ax, ay), (bx, by), (cx, cy) = kept[-2], kept[-1], point
            length = math.hypot(cx - ax, cy - ay)
            between = (bx - ax) * (cx - ax) + (by - ay) * (cy - ay)
            if length == 0 or abs((bx - ax) * (cy - ay) - (by - ay) * (cx - ax)) / length > tolerance or not 0 <= between <= length**2:
                break
            kept.pop()
        kept.append(point)
    return kept


def _conversation_svg(frames: list[Mapping[str, Any]], records: list[FrameRecord], duration: float, max_seq_len: int | None) -> str:
    plot_w = WIDTH - LEFT - RIGHT
    curve = cache_curve(records)
    top_tokens = max([size for _, size in curve] + [max_seq_len or 0, 1]) * 1.05

    def x(t: float) -> float:
        return LEFT + plot_w * min(max(t, 0.0), duration) / duration

    def y(tokens: float) -> float:
        return CHART_TOP + CHART_H * (1 - tokens / top_tokens)

    parts = [f'<svg width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">']
    bottom = CHART_TOP + CHART_H
    step = nice_step(duration)
    for i in range(int(duration / step) + 1):  # time grid and labels
        t = i * step
        parts.append(f'<line x1="{x(t):.1f}" y1="{REF_Y}" x2="{x(t):.1f}" y2="{bottom}" stroke="#eee"/>')
        parts.append(f'<text x="{x(t):.1f}" y="{bottom + 14}" text-anchor="middle">{t:g}s</text>')
    token_step = nice_step(top_tokens, 4)
    for i in range(int(top_tokens / token_step) + 1):  # token grid and labels
        v = i * token_step
        parts.append(f'<line x1="{LEFT}" y1="{y(v):.1f}" x2="{WIDTH - RIGHT}" y2="{y(v):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    parts.append(f'<text x="4" y="{REF_Y + 12}">reference</text><text x="4" y="{GEN_Y + 12}">generated</text>')
    parts.append(f'<text x="4" y="{CHART_TOP + 12}">cache tokens</text>')
    for lane, top, colour in (("ref", REF_Y, REF_COLOUR), ("gen", GEN_Y, GEN_COLOUR)):
        parts.append(f'<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{LANE_H}" fill="#f6f6f6"/>')
        for frame in frames:
            if frame.get(lane):
                label = f"{frame['time']:.1f}s {lane}: {frame[lane]}"
                parts.append(
                    f'<rect class="turn {lane}" x="{x(frame["time"]) - 2:.1f}" y="{top}" width="4" height="{LANE_H}" '
                    f'fill="{colour}"><title>{_e(label)}</title></rect>'
                )
    if max_seq_len:
        parts.append(
            f'<line x1="{LEFT}" y1="{y(max_seq_len):.1f}" x2="{WIDTH - RIGHT}" y2="{y(max_seq_len):.1f}" stroke="#000" '
            f'stroke-dasharray="4 3"><title>max_seq_len {max_seq_len}</title></line>'
        )
    if curve:
        points = _simplify([(x(t), y(size)) for t, size in curve])
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{CURVE_COLOUR}" stroke-width="1.2"/>')
    for record in records:
        for event, before, after in reductions(record):
            label = f"{record['time']:.1f}s {event}: {before} -> {after} tokens"
            if event == "summary" and record.get("summary"):
                label += f"; summary: {record['summary']}"
            cx, colour = x(record["time"]), EVENT_COLOURS[event]
            parts.append(
                f'<g class="reduction {event}"><title>{_e(label)}</title>'
                f'<line x1="{cx:.1f}" y1="{y(before):.1f}" x2="{cx:.1f}" y2="{y(after):.1f}" stroke="{colour}" stroke-width="2"/>'
                f'<circle cx="{cx:.1f}" cy="{y(before):.1f}" r="3" fill="{colour}"/></g>'
            )
    parts.append(f'<line x1="{LEFT}" y1="{bottom}" x2="{WIDTH - RIGHT}" y2="{bottom}" stroke="#999"/></svg>')
    return "\n".join(parts)


def _turns_table(frames: list[Mapping[str, Any]]) -> str:
    rows = [
        f'<tr><td class="time">{frame["time"]:.1f}s</td>'
        f'<td class="gen">{_e(frame.get("gen", ""))}</td><td>{_e(frame.get("ref", ""))}</td></tr>'
        for frame in frames
    ]
    return f'<table><tr><th>time</th><th>generated</th><th>reference</th></tr>{"".join(rows)}</table>'


def write_timeline(
    path_html: str | Path,
    predictions: Mapping[str, Any],
    records: Iterable[FrameRecord],
    title: str,
    max_seq_len: int | None = None,
) -> Path:
    """Write timeline.html from a predictions document and trace records (times in s, sizes in tokens).

    Conversations appear in predictions order, then any found only in the trace. All text is escaped.
    Written atomically (DiskFull when the disk has no room).
    """
    traces = by_conversation(records)
    entries = {str(c["id"]): c for c in predictions.get("conversations", [])}
    ids = list(entries) + [cid for cid in traces if cid not in entries]
    counts = dict.fromkeys(REDUCTION_EVENTS, 0)
    for rows in traces.values():
        for record in rows:
            for event, _, _ in reductions(record):
                counts[event] += 1
    all_frames = [frame for entry in entries.values() for frame in entry.get("frames", [])]
    summary = (
        f"{len(ids)} conversations, {sum(bool(f.get('ref')) for f in all_frames)} reference turns, "
        f"{sum(bool(f.get('gen')) for f in all_frames)} generated turns, "
        + ", ".join(f"{n} {event}" for event, n in counts.items())
        + (f", max_seq_len {max_seq_len}" if max_seq_len else "")
    )
    legend = "".join(
        f'<span><i class="swatch" style="background:{colour}"></i>{_e(name)}</span>'
        for name, colour in [("reference turn", REF_COLOUR), ("generated turn", GEN_COLOUR), ("cache length", CURVE_COLOUR)]
        + [(event, EVENT_COLOURS[event]) for event in REDUCTION_EVENTS]
    )
    body = [f"<h1>{_e(title)}</h1>", f'<p class="meta">{_e(summary)}</p>', f'<p class="legend">{legend}</p>']
    for cid in ids:
        entry, rows = entries.get(cid, {}), traces.get(cid, [])
        frames = entry.get("frames", [])
        times = [f["time"] for f in frames] + [r["time"] for r in rows]
        if entry.get("fps") and entry.get("num_frames"):
            times.append(entry["num_frames"] / entry["fps"])
        duration = max(times + [1.0])
        details = ", ".join(f"{key} {entry[key]}" for key in ("video_uid", "subset", "user_type") if entry.get(key))
        body.append(f"<section><h2>{_e(cid)}</h2>")
        body.append(f'<p class="meta">{_e(details)}{", " if details else ""}{len(rows)} frames traced, {duration:.1f} s</p>')
        if entry.get("error"):
            body.append(f'<p class="error">error: {_e(entry["error"])}</p>')
        body.append(_conversation_svg(frames, rows, duration, max_seq_len))
        body.append(f"<details open><summary>{len(frames)} turns</summary>{_turns_table(frames)}</details></section>")
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path_html = Path(path_html)
    replace_atomically(path_html, lambda staging: staging.write_text(page, encoding="utf-8"))  # DiskFull leaves no half a page
    return path_html
