"""The figures of a sweep summary, drawn from plain rows and trace records (prospect.sweep.summary gathers them):

- pareto.png: F1 and the reference perplexity (lower is better) each against KV-cache memory, and F1
  against time per frame, one point per distinct job with its metric interval as a vertical error bar,
  the Pareto front marked; without F1 (eval=none) the reference perplexity alone; with neither,
  KV-cache memory against time per frame, saying on the figure that F1 is absent.
- cache_timelines.png: cache length over time of each distinct job's first conversation, one panel per
  strategy.
- ref_nll_by_turn.png: per distinct finished job, the mean over conversations of the reference NLL per
  token at its k-th scored reference turn, one line per job, and a dotted vertical line at the median turn
  position of its first cache reduction.

matplotlib is imported inside the functions that draw: importing it costs seconds of start-up.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prospect.eval.intervals import CONFIDENCE
from prospect.eval.per_run_metrics import BY_NAME
from prospect.context_strategies.events import REDUCTION_EVENTS
from prospect.tracking import by_conversation
from prospect.tracking.plots import cache_curve

NO_F1_NOTE = "F1 absent (no job was evaluated: eval=none)"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower cost x and higher F1 y), in increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _figure(width: float, height: float):
    """An Agg figure without pyplot (no display, no change of the global backend: notebooks keep theirs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy, with the next: matplotlib costs ~0.5 s, only when a figure is drawn
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


_MARKERS = "osD^vP*Xh<>p"


def _styles(count: int) -> list[dict]:
    """A distinct colour and marker per point (tab10 colours, then tab20's light ones)."""
    from matplotlib import colormaps  # lazy: matplotlib costs ~0.5 s, only when a figure is drawn

    colours = list(colormaps["tab10"].colors) + list(colormaps["tab20"].colors[1::2])
    return [{"color": colours[i % len(colours)], "marker": _MARKERS[i % len(_MARKERS)]} for i in range(count)]


QUALITY_AXES = {"f1": "F1", "ref_ppl": "reference perplexity, teacher-forced"}  # the y axes, by preference
COST_AXES = {"kv_cache_peak_mb": "peak KV-cache memory (MB)", "time_per_frame": "time per frame (s)"}


def _quality_axis(name: str) -> tuple[str, int]:
    """(axis label, sign): the sign makes higher better for the Pareto front (prospect.eval.per_run_metrics)."""
    higher = BY_NAME[name].higher_is_better
    return f"{QUALITY_AXES[name]} ({'higher' if higher else 'lower'} is better)", 1 if higher else -1


def _error_bar(axis, x: float, row: Mapping, name: str, colour) -> None:
    """The metric's interval as a vertical bar at the job's x, from its low to its high bound as they are (a BCa
    interval of a skewed statistic may leave out the point itself); nothing without an interval."""
    low, high = row.get(f"{name}_low"), row.get(f"{name}_high")
    if low is None or high is None or row.get(name) is None:
        return
    axis.vlines([x], [float(low)], [float(high)], colors=[colour], linewidth=1.1, zorder=2.5, label="_interval")
    axis.scatter([x, x], [float(low), float(high)], marker="_", s=40, color=colour, zorder=2.5, label="_interval")


def pareto_figure(rows: list[dict]):
    """The pareto.png figure, or None when no job finished. F1 and the reference perplexity (lower is better)
    each against KV-cache memory, and F1 (else the perplexity) against time per frame, the metric intervals as
    vertical error bars; with neither metric, KV-cache memory against time per frame with a note that F1 is absent."""
    from matplotlib.ticker import MaxNLocator  # lazy: matplotlib costs ~0.5 s, only when a figure is drawn

    done = [r for r in rows if r["status"] == "ok"]
    if not done:
        return None
    quality = [name for name in QUALITY_AXES if any(r.get(name) is not None for r in done)]
    shown = [r for r in done if any(r.get(name) is not None for name in quality)] or done
    labels = [r.get("legend") or f"jobs {r['jobs']}" for r in shown]
    styles = _styles(len(shown))
    legend_rows = -(-len(shown) // 2)
    if quality:
        # the KV buffer is preallocated to max_seq_len, so the allocator's peak barely tells strategies apart:
        # the memory axis is the KV cache each strategy needs (max cache size x KV bytes per token)
        panels = [("kv_cache_peak_mb", name) for name in quality] + [("time_per_frame", quality[0])]
        figure = _figure(5.6 * len(panels), 4.6 + 0.22 * legend_rows)
        axes = figure.subplots(1, len(panels))
        panels = [(axis, x, y, COST_AXES[x], *_quality_axis(y)) for axis, (x, y) in zip(axes, panels)]
        names = " and ".join("F1" if q == "f1" else "reference perplexity" for q in quality)
        figure.suptitle(f"{names} against cost\none point per distinct job, bars: its {CONFIDENCE:.0%} interval over "
                        "conversations; better is left, and up for F1, down for perplexity", fontsize=11)
        if "f1" not in quality:
            axes[0].set_title(f"{NO_F1_NOTE}: the reference perplexity is shown", fontsize=9, color="tab:red")
    else:
        figure = _figure(8, 5.2 + 0.22 * legend_rows)
        axis = figure.subplots()
        panels = [(axis, "time_per_frame", "kv_cache_peak_mb", "time per frame (s)", "peak KV-cache memory (MB)", -1)]
        figure.suptitle(f"KV-cache memory against time per frame: {NO_F1_NOTE}\none point per distinct job; down and left is better",
                        fontsize=11)
        axis.set_title("F1 absent: these jobs ran without evaluation; run with eval=offline or eval=proassist to plot F1",
                       fontsize=9, color="tab:red")
    for axis, x_name, y_name, x_label, y_label, sign in panels:
        present = [i for i, r in enumerate(shown) if r.get(y_name) is not None]
        points = [(float(shown[i][x_name] or 0.0), float(shown[i][y_name])) for i in present]
        for i, point in zip(present, points):
            axis.scatter([point[0]], [point[1]], s=46, zorder=3, label=labels[i], edgecolors="black", linewidths=0.4, **styles[i])
            _error_bar(axis, point[0], shown[i], y_name, styles[i]["color"])
        front = pareto_front([(x, sign * y) for x, y in points])
        axis.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", linewidth=1.2, alpha=0.7,
                  marker="o", markersize=13, markerfacecolor="none", zorder=2, label="Pareto front")
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.xaxis.set_major_locator(MaxNLocator(nbins=5))
        axis.grid(alpha=0.3)
    handles: dict[str, Any] = {}
    for axis, *_ in panels:  # every job once (a job without F1 may still have a perplexity), the front last
        for handle, text in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(text, handle)
    order = [text for text in labels if text in handles] + ["Pareto front"]
    figure.legend([handles[t] for t in order], order, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return figure


def first_conversation(records: Iterable[Mapping]) -> list[Mapping]:
    """The trace records of the first conversation (those of fed frames: with a time and a cache size)."""
    records = [r for r in records if "time" in r and "cache_after" in r]
    if not records:
        return []
    return [r for r in records if r.get("conversation") == records[0].get("conversation")]


def timelines_figure(panels: Mapping[str, Sequence[tuple[str, Sequence[Mapping], int | None]]]):
    """The cache_timelines.png figure, or None without a line: one panel per strategy ({strategy: lines}), each line
    (its label, the trace records of one conversation, max_seq_len) the cache length over time, the legend beside
    its panel; a dashed max_seq_len line where the panel's lines share one."""
    panels = {strategy: [(text, cache_curve(records), cap) for text, records, cap in lines] for strategy, lines in panels.items() if lines}
    if not panels:
        return None
    most = max(len(lines) for lines in panels.values())
    panel_height = max(2.5, 0.5 + 0.17 * min(most, 14))  # a legend of up to 14 lines fits beside its panel, then 2 columns
    figure = _figure(11, 0.7 + panel_height * len(panels))
    axes = figure.subplots(len(panels), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    for axis, (strategy, lines) in zip(axes, panels.items()):
        for i, (text, points, _) in enumerate(lines):
            times, sizes = zip(*points)
            axis.plot(times, sizes, label=text, linewidth=1.3, color=f"C{i % 10}", linestyle=("-", "--", ":", "-.")[i // 10 % 4])
        caps = {cap for _, _, cap in lines}
        if len(caps) == 1 and None not in caps:
            axis.axhline(caps.pop(), color="black", linestyle="--", linewidth=0.8, label="max_seq_len")
        axis.set_title(f"strategy={strategy}", fontsize=10, loc="left")
        axis.set_ylabel("cache tokens")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                    ncols=1 + (len(lines) > 14), title_fontsize=8)
    axes[-1].set_xlabel("stream time (s), first conversation of each distinct job")
    figure.suptitle("KV-cache length over time, one panel per strategy", fontsize=11)
    return figure


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def turn_scores(records: Sequence[Mapping]) -> tuple[list[float], float | None]:
    """One conversation's trace: the reference NLL per token (ref_nll / ref_tokens) of each scored reference
    turn, in order, and where its first cache reduction happened in turn units: k + 0.5 when it came after the
    k-th scored turn and before the next (a reduction in a scored turn's own record comes before that turn
    is scored: the runner makes room before it prompts); None without a reduction."""
    scores: list[float] = []
    first: float | None = None
    for record in records:
        events = record.get("events") or []
        if first is None and any(event in REDUCTION_EVENTS for event in events):
            first = len(scores) + 0.5
        nll, tokens = record.get("ref_nll"), record.get("ref_tokens")
        if _number(nll) and _number(tokens) and tokens > 0:
            scores.append(float(nll) / float(tokens))
    return scores, first


def nll_by_turn(records: Sequence[Mapping]) -> tuple[list[float], float | None, int]:
    """A job's trace: the mean over conversations of the per-token reference NLL at turn k (k = 1, 2, ...:
    the conversations that have a k-th scored turn), the median over conversations of its first reduction's
    turn position (None when no conversation reduced), and how many conversations had a scored turn."""
    per_conversation = [turn_scores(group) for group in by_conversation(records).values()]
    scored = [scores for scores, _ in per_conversation if scores]
    turns = max((len(scores) for scores in scored), default=0)
    means = [statistics.fmean(scores[k] for scores in scored if len(scores) > k) for k in range(turns)]
    firsts = [first for scores, first in per_conversation if scores and first is not None]
    return means, (statistics.median(firsts) if firsts else None), len(scored)


def nll_by_turn_figure(jobs: Iterable[tuple[str, Sequence[Mapping]]]):
    """The ref_nll_by_turn.png figure, or None when no job's trace has a scored reference turn: per job (its label,
    its trace records; read one at a time) one line of the mean reference NLL per token at its k-th scored turn, and a dotted vertical
    line of the same colour at the median turn position of its first cache reduction. Only the job lines carry
    labels (the reduction lines' start with '_')."""
    from matplotlib.lines import Line2D  # matplotlib loads only to draw (seconds of start-up otherwise)
    from matplotlib.ticker import MaxNLocator

    lines = [(text, *nll_by_turn(records)) for text, records in jobs]
    lines = [line for line in lines if line[1]]
    if not lines:
        return None
    figure = _figure(11, 4.8 + 0.2 * -(-len(lines) // 2))
    axis = figure.subplots()
    for i, (text, means, first, conversations) in enumerate(lines):
        colour, style = f"C{i % 10}", ("-", "--", "-.", (0, (5, 1)))[i // 10 % 4]
        reduced = f"first reduction at {first:.1f}" if first is not None else "no reduction"
        axis.plot(range(1, len(means) + 1), means, color=colour, linestyle=style, marker="o", markersize=3.5, linewidth=1.4,
                  label=f"{text} ({conversations} conv., {reduced})")
        if first is not None:
            axis.axvline(first, color=colour, linestyle=":", linewidth=1.3, label="_first reduction")
    axis.set_xlabel("k-th scored reference turn of a conversation")
    axis.set_ylabel("reference NLL per token (nats), mean over conversations")
    axis.grid(alpha=0.3)
    axis.set_xlim(left=0)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle("Teacher-forced reference NLL per token by turn (higher: the model expects the reference less)\n"
                    "dotted: the median turn position of each job's first cache reduction; later turns average fewer "
                    "conversations", fontsize=10.5)
    handles, texts = axis.get_legend_handles_labels()
    handles.append(Line2D([], [], color="black", linestyle=":", linewidth=1.3))
    texts.append("first cache reduction (median over conversations)")
    figure.legend(handles, texts, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return figure
