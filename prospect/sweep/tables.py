"""summary.md and summary.csv of a sweep, from the rows write_summary computed.

- summary.md, for people: the shared overrides above a table with one row per distinct job (job key:
  jobs sharing one were computed once), a column per varying override, status, each metric as
  `0.412 [0.350, 0.470]` (or the value and a footnote saying why it has no interval), memory, cache
  sizes, compressions; then "Paired differences against the baseline", one row per distinct job
  (the baseline rows say "baseline"); failed and missing jobs listed with their error.
- summary.csv, for pandas: one row per job (`pandas.read_csv` reads it as is, no comment lines): `job`,
  a column per varying override, status, each metric with `METRIC_low`, `METRIC_high` where it has an
  interval (empty where none), `intervals_note`, `baseline` (the baseline row's jobs and label),
  `diff_METRIC`, `diff_METRIC_low`, `diff_METRIC_high`, `diff_METRIC_excludes_zero` (True only where the
  interval excludes 0), `diff_note`, `job_key` (equal keys: one computation), `cached`, `error`,
  `shared_overrides` (the same string in every row) and the job `folder`.

The metrics, their order and which have intervals and differences: prospect.eval.per_run_metrics.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prospect.eval.intervals import CONFIDENCE
from prospect.eval.per_run_metrics import BY_NAME, DIFFERENCE_METRICS, SHOWN_WITH_INTERVALS, SUMMARY_METRICS
from prospect.sweep.baselines import baseline_rule
from prospect.sweep.collect import NO_VALUES_REASON, Job
from prospect.sweep.overrides import Overrides
from prospect.tracking.job_files import replace_atomically


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("\n", " ")


_SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def number_text(value: float, signed: bool = False) -> str:
    """3 significant digits, without an exponent from 0.001 to 1e6: 0.412, 0.35, 50219, +0.021."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) < 1e-3 or abs(value) >= 1e6:
        return f"{value:+.3g}" if signed else f"{value:.3g}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    text = f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def footnote(footnotes: dict[str, int], reason: str) -> str:
    """The superscript number of a reason (numbered in order of first use)."""
    return str(footnotes.setdefault(reason, len(footnotes) + 1)).translate(_SUPERSCRIPTS)


def footnote_lines(footnotes: Mapping[str, int]) -> list[str]:
    return [f"{str(number).translate(_SUPERSCRIPTS)} {reason}" for reason, number in footnotes.items()]


def interval_cell(value: Any, found: Mapping | None, footnotes: dict[str, int]) -> str:
    """`0.412 [0.35, 0.47]`; without an interval, the value and the footnote saying why."""
    if value is None:
        return ""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return _fmt(value)
    text = number_text(float(value))
    if found and "low" in found:
        return f"{text} [{number_text(found['low'])}, {number_text(found['high'])}]"
    return f"{text} {footnote(footnotes, (found or {}).get('reason') or NO_VALUES_REASON)}"


def difference_cell(found: Mapping | None, footnotes: dict[str, int]) -> str:
    """`+0.021 [+0.004, +0.040] *` (`*`: the interval excludes 0); without an interval, the difference (or what
    stands in its place, e.g. "not paired") and the footnote giving the reason."""
    if found is None:
        return ""
    if "low" in found:
        mark = " *" if found["excludes_zero"] else ""
        note = f" {footnote(footnotes, found['note'])}" if found.get("note") else ""  # conversations left out
        return (f"{number_text(found['difference'], True)} [{number_text(found['low'], True)}, "
                f"{number_text(found['high'], True)}]{mark}{note}")
    reason = found.get("reason", "no interval")
    shown = number_text(found["difference"], True) if "difference" in found else reason.split(":", 1)[0]
    return f"{shown} {footnote(footnotes, reason)}"


def shown_metrics(rows: Sequence[Mapping]) -> list[str]:
    """The SUMMARY_METRICS some row has (no empty F1 columns without evaluation)."""
    return [name for name in SUMMARY_METRICS if any(row.get(name) is not None for row in rows)]


def metrics_table(rows: Sequence[Mapping], overrides: Overrides) -> tuple[list[dict[str, str]], list[str]]:
    """summary.md's table as text cells, one {column: cell} per distinct job (the interval metrics as
    `value [low, high]`), and the footnotes its cells point to."""
    footnotes: dict[str, int] = {}
    table = []
    for row in rows:
        cells = {"jobs": row["jobs"], **{key: ", ".join(row["values"].get(key, [])) for key in overrides.varying},
                 "status": row["status"]}
        for name in shown_metrics(rows):
            found = row.get("intervals", {}).get(name)
            cells[name] = interval_cell(row.get(name), found, footnotes) if name in SHOWN_WITH_INTERVALS else _fmt(row.get(name))
        cells.update(job_key=_fmt(row.get("job_key")), cached=_fmt(row.get("cached")))
        table.append(cells)
    return table, footnote_lines(footnotes)


def differences_table(rows: Sequence[Mapping], overrides: Overrides) -> tuple[list[dict[str, str]], list[str]]:
    """The paired-differences table as text cells, one {column: cell} per finished distinct job (a baseline row
    says "baseline"), and the footnotes its cells point to; columns `diff_METRIC` for the metrics some job has."""
    footnotes: dict[str, int] = {}
    shown = [name for name in DIFFERENCE_METRICS if any(name in row.get("differences", {}) for row in rows)]
    table = []
    for row in rows:
        if row["status"] != "ok" or "baseline" not in row:
            continue  # failed and missing jobs are listed below the tables
        note = row.get("baseline_note")
        cells = {"jobs": row["jobs"], **{key: ", ".join(row["values"].get(key, [])) for key in overrides.varying},
                 "baseline": "this row" if row["is_baseline"] else row["baseline"] + (f" {footnote(footnotes, note)}" if note else "")}
        for name in shown:
            if row["is_baseline"]:
                cells[f"diff_{name}"] = "baseline"
            elif row.get("diff_note"):
                cells[f"diff_{name}"] = f"— {footnote(footnotes, row['diff_note'])}"
            else:
                cells[f"diff_{name}"] = difference_cell(row["differences"].get(name), footnotes)
        table.append(cells)
    return table, footnote_lines(footnotes)


def _markdown_table(table: Sequence[Mapping[str, str]]) -> list[str]:
    if not table:
        return []
    columns = list(table[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cells.get(c, "")).replace("|", "\\|") for c in columns) + " |" for cells in table]
    return lines


def _reasons(found: Mapping[str, Mapping]) -> str:
    """'f1, precision: one conversation: no interval ...; ref_ppl: ...': the metrics without an interval by reason."""
    by_reason: dict[str, list[str]] = {}
    for name, value in found.items():
        if "low" not in value:
            by_reason.setdefault(value.get("reason", "no interval"), []).append(name)
        elif value.get("note"):
            by_reason.setdefault(value["note"], []).append(name)
    return "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())


def metric_columns() -> list[str]:
    """summary.csv's metric columns: each metric, and METRIC_low, METRIC_high for those with an interval."""
    columns = []
    for name in SUMMARY_METRICS:
        columns += [name, f"{name}_low", f"{name}_high"] if name in SHOWN_WITH_INTERVALS else [name]
    return columns


def difference_columns() -> list[str]:
    return [f"diff_{name}{end}" for name in DIFFERENCE_METRICS for end in ("", "_low", "_high", "_excludes_zero")]


CSV_FIXED = ("status", *metric_columns(), "intervals_note", "baseline", *difference_columns(), "diff_note", "job_key", "cached",
             "error", "shared_overrides", "folder")  # after job, overrides


def csv_columns(overrides: Overrides) -> list[str]:
    """summary.csv's header: job, a column per varying override, then CSV_FIXED."""
    return ["job", *(override_column(key) for key in overrides.varying), *CSV_FIXED]


def override_column(key: str) -> str:
    """The csv column of a varying override: its key (prefixed where it would shadow a fixed column)."""
    return f"override.{key}" if key in ("job", *CSV_FIXED) else key


def _difference_record(row: Mapping) -> dict:
    """The baseline and diff_* columns of a job of this row."""
    record: dict[str, Any] = {"baseline": row.get("baseline", "") + (f"; {row['baseline_note']}" if row.get("baseline_note") else "")}
    differences = row.get("differences", {})
    for name in DIFFERENCE_METRICS:
        found = differences.get(name, {})
        record[f"diff_{name}"] = found.get("difference")
        record[f"diff_{name}_low"], record[f"diff_{name}_high"] = found.get("low"), found.get("high")
        record[f"diff_{name}_excludes_zero"] = bool(found.get("excludes_zero"))
    record["diff_note"] = "baseline" if row.get("is_baseline") else row.get("diff_note") or _reasons(differences)
    return record


def job_records(jobs: list[Job], overrides: Overrides, sweep_dir: Path, rows_by_folder: Mapping[Path, Mapping] | None = None) -> list[dict]:
    """summary.csv's rows: one per job (intervals and differences from its distinct row in `rows_by_folder`)."""
    records = []
    shared = " ".join(overrides.shared)
    for job in jobs:
        results = job.results or {}
        row = (rows_by_folder or {}).get(job.folder, {})
        found = row.get("intervals", {})
        settings = overrides.settings(job)
        metrics = {}
        for name in SUMMARY_METRICS:
            metrics[name] = results.get("metrics", {}).get(name)
            if name in SHOWN_WITH_INTERVALS:
                metrics[f"{name}_low"], metrics[f"{name}_high"] = found.get(name, {}).get("low"), found.get(name, {}).get("high")
        records.append({
            "job": job.number,
            **{override_column(key): settings.get(key, "") for key in overrides.varying},
            "status": job.status,
            **metrics,
            "intervals_note": _reasons(found),
            **_difference_record(row),
            "job_key": results.get("job_key"),
            "cached": bool(results.get("cached")),
            "error": job.error,
            "shared_overrides": shared,
            "folder": str(job.folder.relative_to(sweep_dir)),
        })
    return records


def write_csv(path: Path, records: list[dict], overrides: Overrides) -> None:
    """summary.csv, written atomically (a full disk raises DiskFull and leaves no half a table)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=csv_columns(overrides))
    writer.writeheader()
    writer.writerows(records)
    replace_atomically(path, lambda staging: staging.write_text(text.getvalue(), newline=""))


def write_markdown(path: Path, rows: list[dict], failures: list[dict], overrides: Overrides, jobs: int = 0,
                   notes: Sequence[str] = (), baseline: str | int | None = None) -> None:
    """The shared overrides once, then one row per distinct job labelled by the varying overrides (metrics with
    their intervals), then the paired differences against the baseline. Written atomically (as write_csv)."""
    lines = ["# Sweep summary", ""]
    lines.append(f"{jobs or sum(len(r['jobs'].split()) for r in rows)} jobs, {len(rows)} distinct (jobs sharing a job key "
                 "were computed once; `cached` counts the jobs that reused that result).")
    lines.append("")
    lines.append("Shared by all jobs: " + (" ".join(f"`{o}`" for o in overrides.shared) if overrides.shared else "none"))
    lines.append("")
    table, footnotes = metrics_table(rows, overrides)
    lines += _markdown_table(table)
    lines += ["", f"`value [low, high]`: the run's metric and its {CONFIDENCE:.0%} bootstrap interval over conversations "
              "(BCa, percentile where BCa cannot be computed; prospect.eval.intervals)."]
    if footnotes:
        lines += [""] + [f"{line}  " for line in footnotes]
    if notes:
        lines += [""] + [f"Note: {note}" for note in notes]
    lines += _differences_section(rows, overrides, baseline)
    if failures:
        lines += ["", "Failed or missing jobs:", ""]
        lines += [f"- jobs {f['jobs']} ({f.get('label') or f['overrides']}): {f['status']}: {f['error'] or 'no results.json'}"
                  for f in failures]
    lines += ["", "summary.csv has one row per job: `job`, a column per varying override, status, the metrics (with "
              "`METRIC_low`, `METRIC_high` where an interval exists), `intervals_note`, `baseline`, `diff_METRIC`, "
              "`diff_METRIC_low`, `diff_METRIC_high`, `diff_METRIC_excludes_zero`, `diff_note`, `job_key` "
              "(jobs with equal keys share one computation), `cached`, `error`, `shared_overrides` (the overrides above, "
              "the same in every row) and `folder`; `pandas.read_csv(\"summary.csv\")` reads it as is."]
    replace_atomically(path, lambda staging: staging.write_text("\n".join(lines) + "\n"))


def _differences_section(rows: list[dict], overrides: Overrides, baseline: str | int | None) -> list[str]:
    table, footnotes = differences_table(rows, overrides)
    if not table:
        return []
    lines = ["", "## Paired differences against the baseline", "",
             f"`job - baseline` over the conversations both ran (paired by conversation id), with its {CONFIDENCE:.0%} "
             f"bootstrap interval; `*`: the interval excludes 0. {direction_text(DIFFERENCE_METRICS)} "
             f"Baseline: {baseline_rule(baseline)}.", ""]
    lines += _markdown_table(table)
    if footnotes:
        lines += [""] + [f"{line}  " for line in footnotes]
    if all(cells.get("baseline") == "this row" for cells in table):
        lines += ["", "Every row is its own baseline: give summary.baseline=N (or prospect.report --baseline N) to compare "
                      "every row with job N."]
    elif not any(key.startswith("diff_") for key in table[0]):
        lines += ["", "No metric could be paired: the jobs' per-conversation rows carry none of " + ", ".join(DIFFERENCE_METRICS) + "."]
    return lines


def direction_text(names: Iterable[str]) -> str:
    """'Lower is better for ref_ppl and ref_nll, higher for f1, ref_top1 and speak_auc.' (as declared:
    prospect.eval.per_run_metrics); '' when none has a direction."""
    names = list(names)
    lower = [name for name in names if BY_NAME[name].higher_is_better is False]
    higher = [name for name in names if BY_NAME[name].higher_is_better]
    groups = [(which, group) for which, group in (("lower", lower), ("higher", higher)) if group]
    text = ", ".join(f"{which}{' is better' if i == 0 else ''} for {_and(group)}" for i, (which, group) in enumerate(groups))
    return f"{text[:1].upper()}{text[1:]}." if text else ""


def _and(names: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
