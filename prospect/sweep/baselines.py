"""The baseline row each row of a sweep summary is compared with, and the paired differences against it.

The baseline (`summary.baseline`, `--baseline`):
- null (default): per row, the row with strategy drop_middle whose other varying overrides match the
  row's (a row covering several values, e.g. strategy=none over three last_keep_len, takes the first
  matching one and says so); without a drop_middle row, the first row;
- a strategy name: the same rule with that strategy;
- an integer: the row holding that job number, for every row.
A baseline naming no job of the sweep raises BaselineError (one line listing the jobs); summary.baseline of
the sweep's multirun.yaml naming none falls back to the default rule, with a note (resolve_baselines).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prospect.eval.intervals import paired_difference
from prospect.eval.per_run_metrics import DIFFERENCE_METRICS
from prospect.sweep.collect import Row, per_conversation
from prospect.sweep.overrides import Overrides, label

log = logging.getLogger(__name__)

DEFAULT_BASELINE_STRATEGY = "drop_middle"


class BaselineError(ValueError):
    """summary.baseline / --baseline names no job of the sweep; str(): one line listing the jobs there."""


class FromSweepConfig:
    """write_summary's default `baseline`: summary.baseline of the sweep's multirun.yaml."""

    def __repr__(self) -> str:
        return "summary.baseline of multirun.yaml"


FROM_SWEEP_CONFIG = FromSweepConfig()


@dataclass
class Baseline:
    """The row a row's differences are taken against: its index among the rows, and a note where the choice
    needs saying (several rows matched, or none did)."""

    index: int
    note: str = ""


def parse_baseline(value: Any) -> str | int | None:
    """summary.baseline or --baseline as given: None or "null" -> None (the default rule); an integer or its
    digits -> a job number; any other text -> a strategy name."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "null", "~")):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BaselineError(f"must be null, a job number or a strategy name, not {value!r}")
    if isinstance(value, int):
        return value
    text = value.strip()
    return int(text) if text.isdigit() else text


def baseline_text(value: str | int | None) -> str:
    """A baseline as summary.baseline writes it: null, 3, snapkv."""
    return "null" if value is None else str(value)


def job_list(rows: Sequence[Row], overrides: Overrides) -> str:
    """'0 (strategy=none), 1 (strategy=drop_middle strategy.last_keep_len=256), ...': every job by its number
    and its own varying overrides."""
    jobs = sorted((job for row in rows for job in row.jobs), key=lambda j: (j.number is None, j.number or 0, str(j.folder)))
    texts = []
    for job in jobs:
        name = str(job.number) if job.number is not None else job.folder.name
        own = label(overrides.values([job]))
        texts.append(f"{name} ({own})" if own else name)
    return ", ".join(texts) or "none"


def _matches(candidate: Mapping[str, list[str]], row: Mapping[str, list[str]], keys: Sequence[str]) -> bool:
    """Whether a candidate baseline row shares a value of the row's for every key (or neither sets the key)."""
    return all(set(candidate.get(k, [])) & set(row.get(k, [])) or not (candidate.get(k) or row.get(k)) for k in keys)


def choose_baselines(rows: Sequence[Row], overrides: Overrides, baseline: Any) -> list[Baseline]:
    """The baseline row of each row (see the module docstring for the rule). Raises BaselineError, one line
    listing the sweep's jobs, when `baseline` names no job of the sweep."""
    if not rows:
        return []
    chosen = parse_baseline(baseline)
    values = [overrides.values(row.jobs) for row in rows]
    if isinstance(chosen, int):
        index = next((i for i, row in enumerate(rows) if any(job.number == chosen for job in row.jobs)), None)
        if index is None:
            raise BaselineError(f"no job of this sweep has number {chosen}; jobs: {job_list(rows, overrides)}")
        return [Baseline(index) for _ in rows]
    strategy = chosen or DEFAULT_BASELINE_STRATEGY
    candidates = [i for i, row in enumerate(rows) if row.first.strategy == strategy]
    if not candidates:
        if chosen is not None:
            raise BaselineError(f"no job of this sweep has strategy {chosen} or number {chosen}; jobs: {job_list(rows, overrides)}")
        return [Baseline(0, f"no {strategy} row: the first row is the baseline") for _ in rows]
    keys = [key for key in overrides.varying if key != "strategy"]
    baselines = []
    for own in values:
        matching = [i for i in candidates if _matches(values[i], own, keys)]
        if len(matching) > 1:
            which = " / ".join(rows[i].numbers for i in matching)
            baselines.append(Baseline(matching[0], f"the first of the {len(matching)} {strategy} rows matching its "
                                                   f"{', '.join(keys)} (jobs {which})"))
        elif matching:
            baselines.append(Baseline(matching[0]))
        else:
            baselines.append(Baseline(candidates[0], f"no {strategy} row has its {', '.join(keys)}: the first {strategy} row"))
    return baselines


def baseline_rule(baseline: str | int | None) -> str:
    """How the baselines of a summary were chosen, in words."""
    if isinstance(baseline, int):
        return f"job {baseline} for every row (summary.baseline={baseline})"
    strategy = baseline or DEFAULT_BASELINE_STRATEGY
    fallback = f"; without a {strategy} row, the first row" if baseline is None else ""
    return (f"per row, the {strategy} row whose other varying overrides match the row's{fallback} "
            f"(summary.baseline={baseline_text(baseline)})")


def sweep_baseline(sweep_dir: Path) -> Any:
    """summary.baseline of the sweep's multirun.yaml (the config Hydra composed for the sweep); None without one."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        log.warning("unreadable %s: %s", path, error)
        return None
    node = config.get("summary") if isinstance(config, dict) else None
    return node.get("baseline") if isinstance(node, dict) else None


def add_differences(rows: list[dict], grouped: Sequence[Row], baselines: Sequence[Baseline]) -> None:
    """Each row dict gets "baseline" (the baseline row's jobs and label), "baseline_jobs", "baseline_note",
    "is_baseline", "differences" ({metric: paired difference}) and "diff_note" (why there are none)."""
    for row, own, choice in zip(rows, grouped, baselines):
        base, base_row = rows[choice.index], grouped[choice.index]
        row["baseline"] = f"jobs {base['jobs']}" + (f" ({base['label']})" if base["label"] else "")
        row["baseline_jobs"] = base["jobs"]
        row["baseline_note"] = choice.note
        row["is_baseline"] = own is base_row
        row["differences"], row["diff_note"] = {}, ""
        if row["is_baseline"]:
            continue
        if not per_conversation(own.results):
            row["diff_note"] = f"no per-conversation results ({row['status']})"
        elif not per_conversation(base_row.results):
            row["diff_note"] = f"the baseline (jobs {base['jobs']}) has no per-conversation results ({base['status']})"
        else:
            row["differences"] = paired_differences(own.results, base_row.results)


def resolve_baselines(sweep_dir: Path, grouped: list[Row], overrides: Overrides, baseline: Any,
               notes: list[str]) -> tuple[list[Baseline], str | int | None]:
    """The baseline of each row and the baseline setting used. An explicit `baseline` naming no job raises
    BaselineError; summary.baseline of multirun.yaml naming none falls back to the default rule, with a note."""
    if not isinstance(baseline, FromSweepConfig):
        return choose_baselines(grouped, overrides, baseline), parse_baseline(baseline)
    configured = sweep_baseline(sweep_dir)
    try:
        return choose_baselines(grouped, overrides, configured), parse_baseline(configured)
    except BaselineError as error:
        notes.append(f"summary.baseline={baseline_text(configured)} of multirun.yaml: {error}; the default baseline "
                     "(summary.baseline=null) was used")
        return choose_baselines(grouped, overrides, None), None


def paired_differences(results: Mapping | None, baseline: Mapping | None,
                       names: Sequence[str] = DIFFERENCE_METRICS) -> dict[str, dict]:
    """{metric: metric(job) - metric(baseline)} over the conversations both ran, paired by conversation id
    (prospect.eval.intervals.paired_difference), for each of `names` both jobs carry; a difference that cannot
    be given holds its "reason" (e.g. "not paired: the jobs ran different conversations ...")."""
    mine, theirs = per_conversation(results), per_conversation(baseline)
    found = {}
    for name in names:
        try:  # an odd row costs its difference, never the table
            difference = paired_difference(mine, theirs, name) if mine and theirs else None
        except Exception as error:
            difference = {"reason": f"no difference: {type(error).__name__}: {' '.join(str(error).split())}"}
        if difference is not None:
            found[name] = difference
    return found
