"""End-of-sweep aggregation: summary.csv, summary.md, pareto.png, cache_timelines.png and
ref_nll_by_turn.png in the sweep dir.

The overrides every job shares are listed once; each job or row is labelled by the overrides that vary.
A job folder without .hydra/overrides.yaml (e.g. copied by hand) has its overrides read from its
results.json's config where that tells them; a key it leaves unknown is counted as varying, never shared.

Intervals: every metric of SHOWN_WITH_INTERVALS (F1, P, R, time_diff, ref_ppl, ref_nll, ref_top1, speak_auc,
avg_cache_size, time_per_frame) gets its 95% bootstrap interval over the job's conversations,
recomputed from results.json's `per_conversation` rows with prospect.eval.intervals (so results written
before runs recorded `intervals` get them too). Fewer than 2 conversations give no interval, and say why.

Paired differences: each row against a baseline row, `metric(job) - metric(baseline)` over the
conversations both ran (prospect.eval.intervals.paired_difference) for DIFFERENCE_METRICS, with its
interval; `*` where the interval excludes 0. Jobs over different conversations are not paired (the
summary gives the reason instead of a number). The baseline (`summary.baseline`, `--baseline`):
- null (default): per row, the row with strategy drop_middle whose other varying overrides match the
  row's (a row covering several values, e.g. strategy=none over three last_keep_len, takes the first
  matching one and says so); without a drop_middle row, the first row;
- a strategy name: the same rule with that strategy;
- an integer: the row holding that job number, for every row.
A baseline naming no job of the sweep raises BaselineError (one line listing the jobs). write_summary
without `baseline` reads `summary.baseline` from the sweep's multirun.yaml (the config Hydra composed);
a value there that names no job falls back to the default rule, with a note.

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
- pareto.png: F1 and the reference perplexity (lower is better) each against KV-cache memory, and F1
  against time per frame, one point per distinct job with its metric interval as a vertical error bar,
  the Pareto front marked; without F1 (eval=none) the reference perplexity alone; with neither,
  KV-cache memory against time per frame, saying on the figure that F1 is absent.
- cache_timelines.png: cache length over time of each distinct job's first conversation, one panel per
  strategy.
- ref_nll_by_turn.png: per distinct finished job, the mean over conversations of the reference NLL per
  token at its k-th scored reference turn (from trace.jsonl), one line per job, and a dotted vertical
  line at the median turn position of its first cache reduction; none without scored references.

Plots never cost the tables: a figure that cannot be drawn is logged and left out.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prospect.eval.intervals import CONFIDENCE, interval, paired_difference
from prospect.tracking import REDUCTION_EVENTS, by_conversation

log = logging.getLogger(__name__)

METRICS = (
    "f1", "precision", "recall", "time_diff", "ref_ppl", "ref_nll", "ref_top1", "speak_auc", "peak_memory_mb",
    "kv_cache_peak_mb", "time_per_frame", "avg_cache_size", "max_cache_size", "cache_compressions",
)
# metrics shown with their interval over conversations (prospect.eval.intervals.POOLED knows each)
SHOWN_WITH_INTERVALS = ("f1", "precision", "recall", "time_diff", "ref_ppl", "ref_nll", "ref_top1", "speak_auc", "avg_cache_size",
                    "time_per_frame")
DIFFERENCE_METRICS = ("f1", "ref_ppl", "ref_nll", "ref_top1", "speak_auc")  # paired against the baseline
DEFAULT_BASELINE_STRATEGY = "drop_middle"
# the keys of a row (one per distinct job) returned by write_summary, besides "label", "values", "legend",
# "intervals" ({metric: interval or reason}), "differences" ({metric: paired difference or reason}) and
# "is_baseline"
COLUMNS = ("jobs", "overrides", "status", *METRICS, *(f"{m}_{end}" for m in SHOWN_WITH_INTERVALS for end in ("low", "high")),
           "baseline", "baseline_jobs", "job_key", "cached", "error")
NO_F1_NOTE = "F1 absent (no job was evaluated: eval=none)"
NO_VALUES_REASON = "no interval: no conversation row gives this metric a value (time_diff needs a matched turn)"


class BaselineError(ValueError):
    """summary.baseline / --baseline names no job of the sweep; str(): one line listing the jobs there."""


class FromSweepConfig:
    """write_summary's default `baseline`: summary.baseline of the sweep's multirun.yaml."""

    def __repr__(self) -> str:
        return "summary.baseline of multirun.yaml"


FROM_SWEEP_CONFIG = FromSweepConfig()


@dataclass
class Job:
    folder: Path
    number: int | None
    overrides: list[str]
    results: dict | None
    known: bool = True  # the overrides were read from .hydra/overrides.yaml (else unknown: [])

    @property
    def status(self) -> str:
        return self.results["status"] if self.results else "missing"

    @property
    def settings(self) -> dict[str, str]:
        """The overrides as {key: value} ('~key' without '=': value '')."""
        return dict(split_override(o) for o in self.overrides)


@dataclass
class Row:
    jobs: list[Job] = field(default_factory=list)

    @property
    def first(self) -> Job:
        return self.jobs[0]

    @property
    def results(self) -> dict:
        """The computed result of the row (a job's own rather than a reused copy), else any, else {}."""
        results = next((j.results for j in self.jobs if j.results and not j.results.get("cached")), None)
        return results or next((j.results for j in self.jobs if j.results), None) or {}

    def as_dict(self) -> dict:
        results = self.results
        metrics = results.get("metrics", {})
        statuses = {j.status for j in self.jobs}
        status = "ok" if statuses == {"ok"} else ("failed" if "failed" in statuses else "missing" if "missing" in statuses else "/".join(sorted(statuses)))
        return {
            "jobs": " ".join(str(j.number) for j in self.jobs),
            "overrides": " | ".join(" ".join(j.overrides) for j in self.jobs),
            "status": status,
            **{name: metrics.get(name) for name in METRICS},
            "job_key": results.get("job_key"),
            "cached": sum(bool(j.results and j.results.get("cached")) for j in self.jobs),
            "error": next((j.results.get("error") for j in self.jobs if j.results and j.results.get("error")), None),
        }


def collect_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job folder of a sweep (a folder holding .hydra/ or results.json), in job order. A '/' in an
    override value nests a job folder deeper; its number is read from the top folder's name."""
    sweep_dir = Path(sweep_dir)
    folders = {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()}
    folders |= {p.parent for p in sweep_dir.rglob("results.json")}
    folders = {f for f in folders if f != sweep_dir and not any(parent in folders for parent in f.parents)}
    jobs = []
    for folder in folders:
        top = folder.relative_to(sweep_dir).parts[0].split("_", 1)[0]
        overrides_file = folder / ".hydra" / "overrides.yaml"
        overrides, known = [], False
        if overrides_file.is_file():
            try:
                overrides = yaml.safe_load(overrides_file.read_text()) or []  # an empty file: no overrides
                known = isinstance(overrides, list)
            except yaml.YAMLError as error:
                log.warning("unreadable %s: %s", overrides_file, error)
        results = None
        if (folder / "results.json").is_file():
            try:
                results = json.loads((folder / "results.json").read_text())
            except json.JSONDecodeError as error:
                results = {"status": "failed", "error": f"unreadable results.json: {error}"}
        jobs.append(Job(folder, int(top) if top.isdigit() else None, [str(o) for o in overrides or []] if known else [], results,
                        known))
    jobs.sort(key=lambda j: (j.number is None, j.number if j.number is not None else 0, str(j.folder)))
    return jobs


def distinct_rows(jobs: list[Job]) -> list[Row]:
    rows: dict[str, Row] = {}
    for job in jobs:
        key = (job.results or {}).get("job_key") or f"missing:{job.folder.name}"
        rows.setdefault(key, Row()).jobs.append(job)
    return list(rows.values())


# ---------------------------------------------------------------------------------------- overrides


def split_override(override: str) -> tuple[str, str]:
    """'strategy.last_keep_len=256' -> ('strategy.last_keep_len', '256'); '~key' -> ('~key', '')."""
    key, _, value = override.partition("=")
    return key, value


def _join(key: str, value: str) -> str:
    return f"{key}={value}" if value or not key.startswith("~") else key


def _parse(value: str) -> Any:
    """An override's value as a config holds it: '256' -> 256, 'true' -> True, '1e-3' -> 0.001, 'cpu' -> 'cpu'."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def _same(override: str, value: Any) -> bool:
    """Whether an override's value is the config value (bools only equal bools, numbers compare as numbers)."""
    parsed = _parse(override)
    if isinstance(parsed, bool) or isinstance(value, bool):
        return parsed is value
    return parsed == value


def _config_value(config: dict | None, key: str) -> tuple[bool, Any]:
    """(found, value) of an override's key in a job's resolved config; a config group's value is its option's
    `name` (strategy=drop_all: config["strategy"]["name"], as every file under conf/ sets it)."""
    key = key.lstrip("+")
    if not config or not key or key.startswith("~"):
        return False, None
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    if isinstance(node, dict):
        return (True, node["name"]) if isinstance(node.get("name"), str) else (False, None)
    return True, node


def _infer_settings(job: Job, keys: Sequence[str], known: Sequence[dict[str, str]]) -> dict[str, str]:
    """{key: value} of a job whose overrides are unknown, for the keys its results.json's config tells:
    written as another job wrote the same value where one did."""
    config = (job.results or {}).get("config")
    settings = {}
    for key in keys:
        found, value = _config_value(config, key)
        if not found:
            continue
        written = next((s[key] for s in known if key in s and _same(s[key], value)), None)
        if written is None:
            if isinstance(value, (dict, list)):
                written = json.dumps(value, separators=(",", ":"))
            else:
                written = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        settings[key] = written
    return settings


@dataclass
class Overrides:
    """The overrides every job shares (as written, in command-line order) and the keys that vary.
    `inferred`: {job folder: settings} of the jobs without .hydra/overrides.yaml, read from their
    results.json's config (the keys it does not tell are missing: such a key is varying, not shared)."""

    shared: list[str]
    varying: list[str]
    inferred: dict[Path, dict[str, str]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, jobs: Sequence[Job]) -> Overrides:
        known = [job.settings for job in jobs if job.known]
        keys = list(dict.fromkeys(key for settings in known for key in settings))
        inferred = {job.folder: _infer_settings(job, keys, known) for job in jobs if not job.known}
        every = known + list(inferred.values())  # an unknown job's missing key makes that key vary
        shared, varying = [], []
        for key in keys:
            values = {settings.get(key) for settings in every}
            if len(values) == 1 and None not in values:
                shared.append(_join(key, known[0][key]))
            else:
                varying.append(key)
        return cls(shared, varying, inferred)

    def settings(self, job: Job) -> dict[str, str]:
        """The job's overrides as {key: value}: its own, or those read from its results.json's config."""
        return job.settings if job.known else self.inferred.get(job.folder, {})

    def values(self, jobs: Iterable[Job]) -> dict[str, list[str]]:
        """{varying key: its distinct values over these jobs, in job order} (a key no job sets: [])."""
        settings = [self.settings(job) for job in jobs]
        return {key: list(dict.fromkeys(s[key] for s in settings if key in s)) for key in self.varying}

    @property
    def unknown(self) -> list[Path]:
        """The folders of the jobs without .hydra/overrides.yaml."""
        return list(self.inferred)

    def short_keys(self) -> dict[str, str]:
        """For plots: each varying key by its last dotted part where that is unambiguous
        (strategy.last_keep_len -> last_keep_len)."""
        tails = [key.rsplit(".", 1)[-1] for key in self.varying]
        return {key: tail if tails.count(tail) == 1 else key for key, tail in zip(self.varying, tails)}


def label(values: dict[str, list[str]], names: dict[str, str] | None = None, skip: Iterable[str] = ()) -> str:
    """'strategy=drop_all strategy.last_keep_len=256,512' from {key: values}: the varying overrides only."""
    names = names or {}
    return " ".join(_join(names.get(key, key), ",".join(v)) for key, v in values.items() if v and key not in set(skip))


# ---------------------------------------------------------------------------------------- intervals


def per_conversation(results: Mapping | None) -> dict[str, dict]:
    """results.json's per-conversation rows ({id: flat row}; {} when it has none)."""
    rows = (results or {}).get("per_conversation")
    return rows if isinstance(rows, dict) else {}


def metric_intervals(results: Mapping | None, names: Sequence[str] = SHOWN_WITH_INTERVALS) -> dict[str, dict]:
    """{metric: interval} of each of `names` the run reports, recomputed from its per-conversation rows
    (prospect.eval.intervals.interval): {"low", "high", "conversations", ...}, or {"reason"} when none can be given."""
    metrics = (results or {}).get("metrics") or {}
    rows = per_conversation(results)
    found = {}
    for name in names:
        if metrics.get(name) is not None:
            try:  # an odd row costs its interval, never the table
                found[name] = interval(rows, name) or {"reason": NO_VALUES_REASON}
            except Exception as error:
                found[name] = {"reason": f"no interval: {type(error).__name__}: {' '.join(str(error).split())}"}
    return found


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


# ---------------------------------------------------------------------------------------- baseline


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


def _jobs_text(row: Row) -> str:
    return " ".join(str(job.number) for job in row.jobs)


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
    candidates = [i for i, row in enumerate(rows) if _strategy(row.first) == strategy]
    if not candidates:
        if chosen is not None:
            raise BaselineError(f"no job of this sweep has strategy {chosen} or number {chosen}; jobs: {job_list(rows, overrides)}")
        return [Baseline(0, f"no {strategy} row: the first row is the baseline") for _ in rows]
    keys = [key for key in overrides.varying if key != "strategy"]
    baselines = []
    for own in values:
        matching = [i for i in candidates if _matches(values[i], own, keys)]
        if len(matching) > 1:
            which = " / ".join(_jobs_text(rows[i]) for i in matching)
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


# ---------------------------------------------------------------------------------------- tables


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
    """The METRICS some row has (no empty F1 columns without evaluation)."""
    return [name for name in METRICS if any(row.get(name) is not None for row in rows)]


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
    for name in METRICS:
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
        for name in METRICS:
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
            "error": results.get("error"),
            "shared_overrides": shared,
            "folder": str(job.folder.relative_to(sweep_dir)),
        })
    return records


def write_csv(path: Path, records: list[dict], overrides: Overrides) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns(overrides))
        writer.writeheader()
        writer.writerows(records)


def write_markdown(path: Path, rows: list[dict], failures: list[dict], overrides: Overrides, jobs: int = 0,
                   notes: Sequence[str] = (), baseline: str | int | None = None) -> None:
    """The shared overrides once, then one row per distinct job labelled by the varying overrides (metrics with
    their intervals), then the paired differences against the baseline."""
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
    path.write_text("\n".join(lines) + "\n")


def _differences_section(rows: list[dict], overrides: Overrides, baseline: str | int | None) -> list[str]:
    table, footnotes = differences_table(rows, overrides)
    if not table:
        return []
    lines = ["", "## Paired differences against the baseline", "",
             f"`job - baseline` over the conversations both ran (paired by conversation id), with its {CONFIDENCE:.0%} "
             "bootstrap interval; `*`: the interval excludes 0. Lower is better for ref_ppl and ref_nll, higher for f1, "
             f"ref_top1 and speak_auc. Baseline: {baseline_rule(baseline)}.", ""]
    lines += _markdown_table(table)
    if footnotes:
        lines += [""] + [f"{line}  " for line in footnotes]
    if all(cells.get("baseline") == "this row" for cells in table):
        lines += ["", "Every row is its own baseline: give summary.baseline=N (or prospect.report --baseline N) to compare "
                      "every row with job N."]
    elif not any(key.startswith("diff_") for key in table[0]):
        lines += ["", "No metric could be paired: the jobs' per-conversation rows carry none of " + ", ".join(DIFFERENCE_METRICS) + "."]
    return lines


# ---------------------------------------------------------------------------------------- plots


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


_MARKERS = "osD^vP*Xh<>p"


def _styles(count: int) -> list[dict]:
    """A distinct colour and marker per point (tab10 colours, then tab20's light ones)."""
    from matplotlib import colormaps

    colours = list(colormaps["tab10"].colors) + list(colormaps["tab20"].colors[1::2])
    return [{"color": colours[i % len(colours)], "marker": _MARKERS[i % len(_MARKERS)]} for i in range(count)]


QUALITY_AXES = {"f1": ("F1 (higher is better)", 1), "ref_ppl": ("reference perplexity, teacher-forced (lower is better)", -1)}
COST_AXES = {"kv_cache_peak_mb": "peak KV-cache memory (MB)", "time_per_frame": "time per frame (s)"}


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
    from matplotlib.ticker import MaxNLocator

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
        panels = [(axis, x, y, COST_AXES[x], QUALITY_AXES[y][0], QUALITY_AXES[y][1]) for axis, (x, y) in zip(axes, panels)]
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


def plot_pareto(path: Path, rows: list[dict]) -> bool:
    figure = pareto_figure(rows)
    if figure is None:
        return False
    figure.savefig(path)
    return True


def trace_records(job: Job) -> list[dict]:
    """The records of a job's trace.jsonl ([] without one); a line cut by a killed job is skipped."""
    trace = job.folder / "trace.jsonl"
    if not trace.is_file():
        return []
    records = []
    for line in trace.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed job
        if isinstance(record, dict):
            records.append(record)
    return records


def _first_conversation(job: Job) -> list[dict]:
    records = [r for r in trace_records(job) if "time" in r and "cache_after" in r]
    if not records:
        return []
    return [r for r in records if r.get("conversation") == records[0].get("conversation")]


def _strategy(job: Job) -> str:
    config = (job.results or {}).get("config") or {}
    return str((config.get("strategy") or {}).get("name") or job.settings.get("strategy") or "?")


def cache_timelines_figure(rows: list[Row], overrides: Overrides | None = None):
    """The cache_timelines.png figure, or None without traces: cache length over time of the first
    conversation of each distinct job, one panel per strategy, each line labelled by the varying overrides
    (but the strategy, the panel's title), the legend beside its panel."""
    from prospect.tracking.plots import cache_curve

    overrides = overrides or Overrides.of([job for row in rows for job in row.jobs])
    names = overrides.short_keys()
    panels: dict[str, list[tuple[str, list[tuple[float, int]], Any]]] = {}
    for row in rows:
        job = next((j for j in row.jobs if j.results and (j.folder / "trace.jsonl").is_file()), None)
        records = _first_conversation(job) if job is not None else []
        if not records:
            continue
        text = label(overrides.values(row.jobs), names, skip=("strategy",)) or f"jobs {' '.join(str(j.number) for j in row.jobs)}"
        max_seq_len = ((job.results.get("config") or {}).get("strategy") or {}).get("max_seq_len")
        panels.setdefault(_strategy(job), []).append((text, cache_curve(records), max_seq_len))
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


def plot_cache_timelines(path: Path, rows: list[Row], overrides: Overrides | None = None) -> bool:
    figure = cache_timelines_figure(rows, overrides)
    if figure is None:
        return False
    figure.savefig(path)
    return True


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


def ref_nll_by_turn_figure(rows: list[Row], overrides: Overrides | None = None):
    """The ref_nll_by_turn.png figure, or None when no finished job's trace has a scored reference turn: per
    distinct finished job one line (labelled by the varying overrides) of the mean reference NLL per token at
    its k-th scored turn, and a dotted vertical line of the same colour at the median turn position of its
    first cache reduction. Only the job lines carry labels (the reduction lines' start with '_')."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    overrides = overrides or Overrides.of([job for row in rows for job in row.jobs])
    names = overrides.short_keys()
    lines = []
    for row in rows:
        if row.as_dict()["status"] != "ok":
            continue
        job = next((j for j in row.jobs if j.results and (j.folder / "trace.jsonl").is_file()), None)
        means, first, conversations = nll_by_turn(trace_records(job)) if job is not None else ([], None, 0)
        if means:
            text = label(overrides.values(row.jobs), names) or f"jobs {_jobs_text(row)}"
            lines.append((text, means, first, conversations))
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


def plot_ref_nll_by_turn(path: Path, rows: list[Row], overrides: Overrides | None = None) -> bool:
    figure = ref_nll_by_turn_figure(rows, overrides)
    if figure is None:
        return False
    figure.savefig(path)
    return True


# ---------------------------------------------------------------------------------------- all of it


def _baselines(sweep_dir: Path, grouped: list[Row], overrides: Overrides, baseline: Any,
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
    names = overrides.short_keys()
    grouped = distinct_rows(jobs)
    notes: list[str] = []
    baselines, used = _baselines(sweep_dir, grouped, overrides, baseline, notes)
    rows = []
    for row in grouped:
        values = overrides.values(row.jobs)
        found = metric_intervals(row.results)
        bounds = {f"{name}_{end}": found.get(name, {}).get(end) for name in SHOWN_WITH_INTERVALS for end in ("low", "high")}
        rows.append({**row.as_dict(), **bounds, "intervals": found, "label": label(values), "values": values,
                     "legend": label(values, names)})
    add_differences(rows, grouped, baselines)
    failures = [r for r in rows if r["status"] != "ok"]
    if overrides.unknown:
        unknown = [job for job in jobs if not job.known]
        which = ", ".join(str(job.number) if job.number is not None else job.folder.name for job in unknown)
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
    by_folder = {job.folder: row for row, group in zip(rows, grouped) for job in group.jobs}
    records = job_records(jobs, overrides, sweep_dir, by_folder)
    write_csv(sweep_dir / "summary.csv", records, overrides)
    files = [sweep_dir / "summary.csv", sweep_dir / "summary.md"]
    plots = {"pareto.png": (lambda path: plot_pareto(path, rows), "no job finished"),
             "cache_timelines.png": (lambda path: plot_cache_timelines(path, grouped, overrides), "no job left a trace"),
             "ref_nll_by_turn.png": (lambda path: plot_ref_nll_by_turn(path, grouped, overrides),
                                     "no finished job's trace has a scored reference turn (ref_nll)")}
    for name, (draw, absent) in plots.items():
        try:  # plots never cost the tables
            if draw(sweep_dir / name):
                files.append(sweep_dir / name)
            else:
                (sweep_dir / name).unlink(missing_ok=True)  # no stale figure from an earlier summary
                notes.append(f"no {name}: {absent}")
        except Exception as error:
            log.warning("could not draw %s: %s: %s", name, type(error).__name__, error)
    write_markdown(sweep_dir / "summary.md", rows, failures, overrides, len(jobs), notes, used)
    for note in notes:
        log.info("sweep summary: %s", note)
    return {"rows": rows, "records": records, "failures": failures, "overrides": overrides, "notes": notes, "files": files,
            "jobs": len(jobs), "baseline": used}
