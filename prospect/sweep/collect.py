"""The jobs of a sweep folder: one Job per job folder (its overrides and results.json), grouped into one Row
per distinct job (the jobs sharing a job key were computed once); what a job's results.json and trace.jsonl
give (per-conversation rows, the intervals recomputed from them, trace records)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from prospect.eval.intervals import interval
from prospect.eval.per_run_metrics import SHOWN_WITH_INTERVALS, SUMMARY_METRICS
from prospect.stream.frame_record import FrameRecord

log = logging.getLogger(__name__)

NO_VALUES_REASON = "no interval: no conversation row gives this metric a value (time_diff needs a matched turn)"


def split_override(override: str) -> tuple[str, str]:
    """'strategy.last_keep_len=256' -> ('strategy.last_keep_len', '256'); '~key' -> ('~key', '')."""
    key, _, value = override.partition("=")
    return key, value


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
    def error(self) -> str | None:
        """Its results.json's error; for a job without one that left other files (stopped by a full disk,
        killed), that its files are incomplete."""
        if self.results:
            return self.results.get("error")
        kept = [name for name in ("trace.jsonl", "predictions.json") if (self.folder / name).is_file()]
        if kept:
            return (f"no results.json: the job's files are incomplete (it stopped before writing it, e.g. on a full disk; "
                    f"{' and '.join(kept)} {'holds' if len(kept) == 1 else 'hold'} what it computed)")
        return None

    @property
    def settings(self) -> dict[str, str]:
        """The overrides as {key: value} ('~key' without '=': value '')."""
        return dict(split_override(o) for o in self.overrides)

    @property
    def strategy(self) -> str:
        """The job's strategy name: its results.json's config tells it, else its overrides; '?' when neither does."""
        config = (self.results or {}).get("config") or {}
        return str((config.get("strategy") or {}).get("name") or self.settings.get("strategy") or "?")


@dataclass
class Row:
    jobs: list[Job] = field(default_factory=list)

    @property
    def first(self) -> Job:
        return self.jobs[0]

    @property
    def numbers(self) -> str:
        """The job numbers of the row: '3 4 5'."""
        return " ".join(str(job.number) for job in self.jobs)

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
            "jobs": self.numbers,
            "overrides": " | ".join(" ".join(j.overrides) for j in self.jobs),
            "status": status,
            **{name: metrics.get(name) for name in SUMMARY_METRICS},
            "job_key": results.get("job_key"),
            "cached": sum(bool(j.results and j.results.get("cached")) for j in self.jobs),
            "error": next((j.error for j in self.jobs if j.error), None),
        }


def collect_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job folder of a sweep (a folder holding .hydra/, results.json, or what a job streams:
    trace.jsonl, predictions.json), in job order. A '/' in an override value nests a job folder deeper; its
    number is read from the top folder's name."""
    sweep_dir = Path(sweep_dir)
    folders = {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()}
    for name in ("results.json", "trace.jsonl", "predictions.json"):
        folders |= {p.parent for p in sweep_dir.rglob(name)}
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


def trace_records(job: Job) -> list[FrameRecord]:
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
