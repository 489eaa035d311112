"""End-of-sweep aggregation: summary.csv, summary.md, pareto.png and cache_timelines.png in the sweep dir.

One row per distinct job (job key): the overrides of every job that shares it, status, F1, P, R, peak
memory, time per frame, cache sizes, compressions. Jobs without results.json (killed) are listed as
missing; failed jobs keep their error.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

COLUMNS = (
    "jobs", "overrides", "status", "f1", "precision", "recall", "peak_memory_mb", "kv_cache_peak_mb", "time_per_frame",
    "avg_cache_size", "max_cache_size", "cache_compressions", "job_key", "cached", "error",
)


@dataclass
class Job:
    folder: Path
    number: int | None
    overrides: list[str]
    results: dict | None

    @property
    def status(self) -> str:
        return self.results["status"] if self.results else "missing"


@dataclass
class Row:
    jobs: list[Job] = field(default_factory=list)

    @property
    def first(self) -> Job:
        return self.jobs[0]

    def as_dict(self) -> dict:
        results = next((j.results for j in self.jobs if j.results and not j.results.get("cached")), None)
        results = results or next((j.results for j in self.jobs if j.results), None) or {}
        metrics = results.get("metrics", {})
        statuses = {j.status for j in self.jobs}
        status = "ok" if statuses == {"ok"} else ("failed" if "failed" in statuses else "missing" if "missing" in statuses else "/".join(sorted(statuses)))
        return {
            "jobs": " ".join(str(j.number) for j in self.jobs),
            "overrides": " | ".join(" ".join(j.overrides) for j in self.jobs),
            "status": status,
            **{name: metrics.get(name) for name in COLUMNS[3:12]},
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
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        results = None
        if (folder / "results.json").is_file():
            try:
                results = json.loads((folder / "results.json").read_text())
            except json.JSONDecodeError as error:
                results = {"status": "failed", "error": f"unreadable results.json: {error}"}
        jobs.append(Job(folder, int(top) if top.isdigit() else None, [str(o) for o in overrides or []], results))
    jobs.sort(key=lambda j: (j.number is None, j.number if j.number is not None else 0, str(j.folder)))
    return jobs


def distinct_rows(jobs: list[Job]) -> list[Row]:
    rows: dict[str, Row] = {}
    for job in jobs:
        key = (job.results or {}).get("job_key") or f"missing:{job.folder.name}"
        rows.setdefault(key, Row()).jobs.append(job)
    return list(rows.values())


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/") if not isinstance(value, str) else value.replace("\n", " ")


def write_markdown(path: Path, rows: list[dict], failures: list[dict]) -> None:
    lines = ["| " + " | ".join(COLUMNS[:-1]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "/") if c != "overrides" else row[c].replace("|", "<br>") for c in COLUMNS[:-1]) + " |")
    if failures:
        lines += ["", "Failed or missing jobs:", ""]
        lines += [f"- jobs {f['jobs']} ({f['overrides']}): {f['status']}: {f['error'] or 'no results.json'}" for f in failures]
    path.write_text("\n".join(lines) + "\n")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower cost x and higher F1 y), in increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(path: Path, rows: list[dict]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "ok" and r["f1"] is not None]
    if not done:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    # the KV buffer is preallocated to max_seq_len, so the allocator's peak barely tells strategies apart:
    # the memory axis is the KV cache each strategy needs (max cache size x KV bytes per token)
    for axis, cost, label in ((axes[0], "kv_cache_peak_mb", "peak KV-cache memory (MB)"), (axes[1], "time_per_frame", "time per frame (s)")):
        points = [(float(r[cost] or 0.0), float(r["f1"])) for r in done]
        front = pareto_front(points)
        axis.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", zorder=2)
        for point, row in zip(points, done):
            axis.annotate(row["overrides"].split(" | ")[0] or row["jobs"], point, fontsize=7, xytext=(3, 3), textcoords="offset points")
        axis.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", marker="o", label="Pareto front", zorder=3)
        axis.set_xlabel(label)
        axis.set_ylabel("F1")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("F1 against cost (one point per distinct job)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_cache_timelines(path: Path, rows: list[Row]) -> bool:
    """Cache length over time of one conversation (the first) per job, grouped by strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[str, list[float], list[int]]]] = {}
    for row in rows:
        job = next((j for j in row.jobs if j.results and (j.folder / "trace.jsonl").is_file()), None)
        if job is None:
            continue
        records = [json.loads(line) for line in (job.folder / "trace.jsonl").read_text().splitlines() if line.strip()]
        if not records:
            continue
        first = records[0]["conversation"]
        mine = [r for r in records if r["conversation"] == first]
        strategy = job.results.get("config", {}).get("strategy", {}).get("name", "?")
        label = " ".join(job.overrides) or job.folder.name
        curves.setdefault(strategy, []).append((label, [r["time"] for r in mine], [r.get("cache_max", r["cache_after"]) for r in mine]))
    if not curves:
        return False
    figure, axes = plt.subplots(len(curves), 1, figsize=(10, 2.6 * len(curves)), squeeze=False)
    for axis, (strategy, lines) in zip(axes[:, 0], sorted(curves.items())):
        for label, times, lengths in lines:
            axis.plot(times, lengths, label=label, linewidth=1.2)
        axis.set_title(strategy, fontsize=10)
        axis.set_ylabel("cache tokens")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("time (s), first conversation")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_summary(sweep_dir: str | Path) -> dict:
    """Aggregate a sweep dir; returns {"rows", "failures", "files"}."""
    sweep_dir = Path(sweep_dir)
    jobs = collect_jobs(sweep_dir)
    grouped = distinct_rows(jobs)
    rows = [row.as_dict() for row in grouped]
    failures = [r for r in rows if r["status"] != "ok"]
    with (sweep_dir / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(sweep_dir / "summary.md", rows, failures)
    files = [sweep_dir / "summary.csv", sweep_dir / "summary.md"]
    try:
        if plot_pareto(sweep_dir / "pareto.png", rows):
            files.append(sweep_dir / "pareto.png")
        if plot_cache_timelines(sweep_dir / "cache_timelines.png", grouped):
            files.append(sweep_dir / "cache_timelines.png")
    except Exception as error:  # plots never cost the tables
        log.warning("could not draw the sweep plots: %s: %s", type(error).__name__, error)
    return {"rows": rows, "failures": failures, "files": files, "jobs": len(jobs)}
