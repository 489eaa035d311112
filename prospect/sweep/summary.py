"""End-of-sweep aggregation: summary.csv, summary.md, pareto.png, cache_timelines.png and
ref_nll_by_turn.png in the sweep dir (write_summary; prospect.sweep.callbacks and prospect.report call it).

The overrides every job shares are listed once; each job or row is labelled by the overrides that vary
(prospect.sweep.overrides). A job folder without .hydra/overrides.yaml (e.g. copied by hand) has its
overrides read from its results.json's config where that tells them; a key it leaves unknown is counted as
varying, never shared.

Intervals: every summary metric with an aggregate (prospect.eval.per_run_metrics.SHOWN_WITH_INTERVALS: F1,
P, R, time_diff, ref_ppl, ref_nll, ref_top1, speak_auc, avg_cache_size, time_per_frame) gets its 95%
bootstrap interval over the job's conversations, recomputed from results.json's `per_conversation` rows with
prospect.eval.intervals (so results written before runs recorded `intervals` get them too). Fewer than 2
conversations give no interval, and say why.

Paired differences: each row against a baseline row (prospect.sweep.baselines), `metric(job) -
metric(baseline)` over the conversations both ran (prospect.eval.intervals.paired_difference) for
DIFFERENCE_METRICS, with its interval; `*` where the interval excludes 0. Jobs over different conversations
are not paired (the summary gives the reason instead of a number). write_summary without `baseline` reads
`summary.baseline` from the sweep's multirun.yaml (the config Hydra composed); a value there that names no
job falls back to the default rule, with a note.

The files: summary.md and summary.csv (prospect.sweep.tables), the figures (prospect.tracking.sweep_figures).
Plots never cost the tables: a figure that cannot be drawn is logged and left out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from prospect.eval.per_run_metrics import SHOWN_WITH_INTERVALS, SUMMARY_METRICS
from prospect.sweep.baselines import FROM_SWEEP_CONFIG, FromSweepConfig, add_differences, resolve_baselines
from prospect.sweep.collect import Job, Row, collect_jobs, distinct_rows, metric_intervals, trace_records
from prospect.sweep.overrides import Overrides, label
from prospect.sweep.tables import job_records, write_csv, write_markdown
from prospect.signals import DiskFull
from prospect.tracking.job_files import replace_atomically
from prospect.tracking.sweep_figures import NO_F1_NOTE, first_conversation, nll_by_turn_figure, pareto_figure, timelines_figure

log = logging.getLogger(__name__)

# the keys of a row (one per distinct job) returned by write_summary, besides "label", "values", "legend",
# "intervals" ({metric: interval or reason}), "differences" ({metric: paired difference or reason}) and
# "is_baseline"
COLUMNS = ("jobs", "overrides", "status", *SUMMARY_METRICS, *(f"{m}_{end}" for m in SHOWN_WITH_INTERVALS for end in ("low", "high")),
           "baseline", "baseline_jobs", "job_key", "cached", "error")


def summary_rows(grouped: Sequence[Row], overrides: Overrides) -> list[dict]:
    """One dict per distinct job: its metrics, their intervals and bounds, its label and legend."""
    names = overrides.short_keys()
    rows = []
    for row in grouped:
        values = overrides.values(row.jobs)
        found = metric_intervals(row.results)
        bounds = {f"{name}_{end}": found.get(name, {}).get(end) for name in SHOWN_WITH_INTERVALS for end in ("low", "high")}
        rows.append({**row.as_dict(), **bounds, "intervals": found, "label": label(values), "values": values,
                     "legend": label(values, names)})
    return rows


def _traced(row: Row) -> Job | None:
    """The first job of the row with results and a trace.jsonl."""
    return next((j for j in row.jobs if j.results and (j.folder / "trace.jsonl").is_file()), None)


def cache_timelines_figure(rows: list[Row], overrides: Overrides | None = None):
    """The cache_timelines.png figure, or None without traces: cache length over time of the first
    conversation of each distinct job, one panel per strategy, each line labelled by the varying overrides
    (but the strategy, the panel's title), the legend beside its panel."""
    overrides = overrides or Overrides.of([job for row in rows for job in row.jobs])
    names = overrides.short_keys()
    panels: dict[str, list] = {}
    for row in rows:
        job = _traced(row)
        records = first_conversation(trace_records(job)) if job is not None else []
        if records:
            text = label(overrides.values(row.jobs), names, skip=("strategy",)) or f"jobs {row.numbers}"
            max_seq_len = ((job.results.get("config") or {}).get("strategy") or {}).get("max_seq_len")
            panels.setdefault(job.strategy, []).append((text, records, max_seq_len))
    return timelines_figure(panels)


def ref_nll_by_turn_figure(rows: list[Row], overrides: Overrides | None = None):
    """The ref_nll_by_turn.png figure, or None when no finished job's trace has a scored reference turn: one line
    per distinct finished job, labelled by the varying overrides (prospect.tracking.sweep_figures.nll_by_turn_figure)."""
    overrides = overrides or Overrides.of([job for row in rows for job in row.jobs])
    names = overrides.short_keys()

    def jobs() -> Iterator[tuple[str, list[dict]]]:  # one trace in memory at a time
        for row in rows:
            job = _traced(row) if row.as_dict()["status"] == "ok" else None
            if job is not None:
                yield label(overrides.values(row.jobs), names) or f"jobs {row.numbers}", trace_records(job)

    return nll_by_turn_figure(jobs())


def _notes(jobs: Sequence[Job], overrides: Overrides, rows: Sequence[dict]) -> list[str]:
    """What a reader of the summary should know: jobs without overrides.yaml, F1 absent or partly absent."""
    notes = []
    if overrides.unknown:
        which = ", ".join(str(job.number) if job.number is not None else job.folder.name for job in jobs if not job.known)
        notes.append(f"job(s) {which} have no .hydra/overrides.yaml: their overrides were read from results.json's config, "
                     "and a key that config does not tell is counted as varying.")
    done = [r for r in rows if r["status"] == "ok"]
    if done and all(r["f1"] is None for r in done):
        if any(r.get("ref_ppl") is not None for r in done):
            notes.append(f"{NO_F1_NOTE}; the stream's own scores (ref_ppl, ref_nll, ref_top1, speak_auc) are shown, and "
                         "pareto.png plots the reference perplexity against KV-cache memory and time per frame instead of F1.")
        else:
            notes.append(f"{NO_F1_NOTE}; pareto.png shows KV-cache memory against time per frame instead of F1.")
    elif any(r["f1"] is None for r in done):
        notes.append(f"{sum(r['f1'] is None for r in done)} finished job(s) without F1 are left out of pareto.png's F1 panels.")
    return notes


def _draw_figures(sweep_dir: Path, rows: list[dict], grouped: list[Row], overrides: Overrides, notes: list[str]) -> list[Path]:
    """Write the figures; returns the files written. A figure with nothing to show is removed (no stale one from
    an earlier summary) and noted; one that cannot be drawn is logged, one the disk has no room for noted (each
    is written atomically: never half a PNG)."""
    figures = {"pareto.png": (lambda: pareto_figure(rows), "no job finished"),
               "cache_timelines.png": (lambda: cache_timelines_figure(grouped, overrides), "no job left a trace"),
               "ref_nll_by_turn.png": (lambda: ref_nll_by_turn_figure(grouped, overrides),
                                       "no finished job's trace has a scored reference turn (ref_nll)")}
    files = []
    for name, (draw, absent) in figures.items():
        try:  # plots never cost the tables
            figure = draw()
            if figure is not None:
                replace_atomically(sweep_dir / name, lambda staging: figure.savefig(staging, format="png"))
                files.append(sweep_dir / name)
            else:
                (sweep_dir / name).unlink(missing_ok=True)
                notes.append(f"no {name}: {absent}")
        except DiskFull as error:
            notes.append(f"no {name}: {error}")
        except Exception as error:
            log.warning("could not draw %s: %s: %s", name, type(error).__name__, error)
    return files


def write_summary(sweep_dir: str | Path, baseline: str | int | None | FromSweepConfig = FROM_SWEEP_CONFIG) -> dict:
    """Aggregate a sweep dir. `baseline`: what the paired differences are taken against (summary.baseline:
    None = the default rule, a strategy name, a job number; by default summary.baseline of the sweep's
    multirun.yaml). Raises BaselineError, before writing anything, when an explicit `baseline` names no job.

    Returns {"rows" (one dict per distinct job: COLUMNS plus "label" = the varying overrides, "values" =
    {varying key: values}, "legend", "intervals", "differences", "is_baseline", "baseline_note", "diff_note"),
    "records" (summary.csv's rows, one per job), "failures", "overrides" (Overrides: shared, varying), "notes"
    (what a reader should know, e.g. F1 absent), "files", "jobs", "baseline" (the setting used)}."""
    sweep_dir = Path(sweep_dir)
    jobs = collect_jobs(sweep_dir)
    overrides = Overrides.of(jobs)
    grouped = distinct_rows(jobs)
    notes: list[str] = []
    baselines, used = resolve_baselines(sweep_dir, grouped, overrides, baseline, notes)
    rows = summary_rows(grouped, overrides)
    add_differences(rows, grouped, baselines)
    failures = [r for r in rows if r["status"] != "ok"]
    notes += _notes(jobs, overrides, rows)
    by_folder = {job.folder: row for row, group in zip(rows, grouped) for job in group.jobs}
    records = job_records(jobs, overrides, sweep_dir, by_folder)
    write_csv(sweep_dir / "summary.csv", records, overrides)
    files = [sweep_dir / "summary.csv", sweep_dir / "summary.md"]
    files += _draw_figures(sweep_dir, rows, grouped, overrides, notes)
    write_markdown(sweep_dir / "summary.md", rows, failures, overrides, len(jobs), notes, used)
    for note in notes:
        log.info("sweep summary: %s", note)
    return {"rows": rows, "records": records, "failures": failures, "overrides": overrides, "notes": notes, "files": files,
            "jobs": len(jobs), "baseline": used}
