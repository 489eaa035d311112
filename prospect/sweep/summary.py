"""End-of-sweep aggregation: summary.csv, summary.md, pareto.png and cache_timelines.png in the sweep dir.

The overrides every job shares are listed once; each job or row is labelled by the overrides that vary.
A job folder without .hydra/overrides.yaml (e.g. copied by hand) has its overrides read from its
results.json's config where that tells them; a key it leaves unknown is counted as varying, never shared.

- summary.md, for people: the shared overrides above a table with one row per distinct job (job key:
  jobs sharing one were computed once), a column per varying override, status, F1, P, R, memory, time
  per frame, cache sizes, compressions; failed and missing jobs listed with their error.
- summary.csv, for pandas: one row per job (`pandas.read_csv` reads it as is, no comment lines): `job`,
  a column per varying override, status, metrics, `job_key` (equal keys: one computation), `cached`,
  `error`, `shared_overrides` (the same string in every row) and the job `folder`.
- pareto.png: F1 against KV-cache memory and against time per frame, the Pareto front marked; without
  F1 (eval=none), KV-cache memory against time per frame, saying on the figure that F1 is absent.
- cache_timelines.png: cache length over time of each distinct job's first conversation, one panel per
  strategy.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

METRICS = (
    "f1", "precision", "recall", "peak_memory_mb", "kv_cache_peak_mb", "time_per_frame", "avg_cache_size", "max_cache_size",
    "cache_compressions",
)
F1_METRICS = ("f1", "precision", "recall")
# the keys of a row (one per distinct job) returned by write_summary, besides "label", "values", "legend"
COLUMNS = ("jobs", "overrides", "status", *METRICS, "job_key", "cached", "error")
NO_F1_NOTE = "F1 absent (no job was evaluated: eval=none)"


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


# ---------------------------------------------------------------------------------------- tables


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("\n", " ")


CSV_FIXED = ("status", *METRICS, "job_key", "cached", "error", "shared_overrides", "folder")  # after job, overrides


def csv_columns(overrides: Overrides) -> list[str]:
    """summary.csv's header: job, a column per varying override, then CSV_FIXED."""
    return ["job", *(override_column(key) for key in overrides.varying), *CSV_FIXED]


def override_column(key: str) -> str:
    """The csv column of a varying override: its key (prefixed where it would shadow a fixed column)."""
    return f"override.{key}" if key in ("job", *CSV_FIXED) else key


def job_records(jobs: list[Job], overrides: Overrides, sweep_dir: Path) -> list[dict]:
    """summary.csv's rows: one per job."""
    records = []
    shared = " ".join(overrides.shared)
    for job in jobs:
        results = job.results or {}
        settings = overrides.settings(job)
        records.append({
            "job": job.number,
            **{override_column(key): settings.get(key, "") for key in overrides.varying},
            "status": job.status,
            **{name: results.get("metrics", {}).get(name) for name in METRICS},
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
                   notes: Sequence[str] = ()) -> None:
    """The shared overrides once, then one row per distinct job labelled by the varying overrides."""
    has_f1 = any(row.get("f1") is not None for row in rows)
    metrics = [m for m in METRICS if has_f1 or m not in F1_METRICS]
    columns = ["jobs", *overrides.varying, "status", *metrics, "job_key", "cached"]
    lines = ["# Sweep summary", ""]
    lines.append(f"{jobs or sum(len(r['jobs'].split()) for r in rows)} jobs, {len(rows)} distinct (jobs sharing a job key "
                 "were computed once; `cached` counts the jobs that reused that result).")
    lines.append("")
    lines.append("Shared by all jobs: " + (" ".join(f"`{o}`" for o in overrides.shared) if overrides.shared else "none"))
    lines.append("")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        values = row.get("values", {})
        cells = [", ".join(values.get(c, [])) if c in overrides.varying else _fmt(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if notes:
        lines += [""] + [f"Note: {note}" for note in notes]
    if failures:
        lines += ["", "Failed or missing jobs:", ""]
        lines += [f"- jobs {f['jobs']} ({f.get('label') or f['overrides']}): {f['status']}: {f['error'] or 'no results.json'}"
                  for f in failures]
    lines += ["", "summary.csv has one row per job: `job`, a column per varying override, status, the metrics, `job_key` "
              "(jobs with equal keys share one computation), `cached`, `error`, `shared_overrides` (the overrides above, "
              "the same in every row) and `folder`; `pandas.read_csv(\"summary.csv\")` reads it as is."]
    path.write_text("\n".join(lines) + "\n")


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


def pareto_figure(rows: list[dict]):
    """The pareto.png figure, or None when no job finished. F1 against KV-cache memory and against time per
    frame; without F1, KV-cache memory against time per frame with a note that F1 is absent."""
    done = [r for r in rows if r["status"] == "ok"]
    scored = [r for r in done if r.get("f1") is not None]
    if not done:
        return None
    shown = scored or done
    labels = [r.get("legend") or f"jobs {r['jobs']}" for r in shown]
    styles = _styles(len(shown))
    legend_rows = -(-len(shown) // 2)
    if scored:
        figure = _figure(12, 4.6 + 0.22 * legend_rows)
        axes = figure.subplots(1, 2)
        # the KV buffer is preallocated to max_seq_len, so the allocator's peak barely tells strategies apart:
        # the memory axis is the KV cache each strategy needs (max cache size x KV bytes per token)
        panels = [(axes[0], "kv_cache_peak_mb", "f1", "peak KV-cache memory (MB)", "F1", 1),
                  (axes[1], "time_per_frame", "f1", "time per frame (s)", "F1", 1)]
        figure.suptitle("F1 against cost (one point per distinct job; up and left is better)")
    else:
        figure = _figure(8, 5.2 + 0.22 * legend_rows)
        axis = figure.subplots()
        panels = [(axis, "time_per_frame", "kv_cache_peak_mb", "time per frame (s)", "peak KV-cache memory (MB)", -1)]
        figure.suptitle(f"KV-cache memory against time per frame: {NO_F1_NOTE}\none point per distinct job; down and left is better",
                        fontsize=11)
        axis.set_title("F1 absent: these jobs ran without evaluation; run with eval=offline or eval=proassist to plot F1",
                       fontsize=9, color="tab:red")
    for axis, x_name, y_name, x_label, y_label, sign in panels:
        points = [(float(r[x_name] or 0.0), float(r[y_name] or 0.0)) for r in shown]
        for point, style, text in zip(points, styles, labels):
            axis.scatter([point[0]], [point[1]], s=46, zorder=3, label=text, edgecolors="black", linewidths=0.4, **style)
        front = pareto_front([(x, sign * y) for x, y in points])
        axis.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", linewidth=1.2, alpha=0.7,
                  marker="o", markersize=13, markerfacecolor="none", zorder=2, label="Pareto front")
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.grid(alpha=0.3)
    handles, texts = panels[0][0].get_legend_handles_labels()
    figure.legend(handles, texts, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return figure


def plot_pareto(path: Path, rows: list[dict]) -> bool:
    figure = pareto_figure(rows)
    if figure is None:
        return False
    figure.savefig(path)
    return True


def _first_conversation(job: Job) -> list[dict]:
    trace = job.folder / "trace.jsonl"
    if not trace.is_file():
        return []
    records = []
    for line in trace.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed job
    records = [r for r in records if isinstance(r, dict) and "time" in r and "cache_after" in r]
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


# ---------------------------------------------------------------------------------------- all of it


def write_summary(sweep_dir: str | Path) -> dict:
    """Aggregate a sweep dir. Returns {"rows" (one dict per distinct job: COLUMNS plus "label" = the varying
    overrides, "values" = {varying key: values}, "legend"), "records" (summary.csv's rows, one per job),
    "failures", "overrides" (Overrides: shared, varying), "notes" (what a reader should know, e.g. F1
    absent), "files", "jobs"}."""
    sweep_dir = Path(sweep_dir)
    jobs = collect_jobs(sweep_dir)
    overrides = Overrides.of(jobs)
    names = overrides.short_keys()
    grouped = distinct_rows(jobs)
    rows = []
    for row in grouped:
        values = overrides.values(row.jobs)
        rows.append({**row.as_dict(), "label": label(values), "values": values, "legend": label(values, names)})
    failures = [r for r in rows if r["status"] != "ok"]
    notes = []
    if overrides.unknown:
        unknown = [job for job in jobs if not job.known]
        which = ", ".join(str(job.number) if job.number is not None else job.folder.name for job in unknown)
        notes.append(f"job(s) {which} have no .hydra/overrides.yaml: their overrides were read from results.json's config, "
                     "and a key that config does not tell is counted as varying.")
    done = [r for r in rows if r["status"] == "ok"]
    if done and all(r["f1"] is None for r in done):
        notes.append(f"{NO_F1_NOTE}; pareto.png shows KV-cache memory against time per frame instead of F1.")
    elif any(r["f1"] is None for r in done):
        notes.append(f"{sum(r['f1'] is None for r in done)} finished job(s) without F1 are left out of pareto.png.")
    records = job_records(jobs, overrides, sweep_dir)
    write_csv(sweep_dir / "summary.csv", records, overrides)
    files = [sweep_dir / "summary.csv", sweep_dir / "summary.md"]
    plots = {"pareto.png": lambda path: plot_pareto(path, rows),
             "cache_timelines.png": lambda path: plot_cache_timelines(path, grouped, overrides)}
    for name, draw in plots.items():
        try:  # plots never cost the tables
            if draw(sweep_dir / name):
                files.append(sweep_dir / name)
            else:
                (sweep_dir / name).unlink(missing_ok=True)  # no stale figure from an earlier summary
                notes.append(f"no {name}: " + ("no job finished" if name == "pareto.png" else "no job left a trace"))
        except Exception as error:
            log.warning("could not draw %s: %s: %s", name, type(error).__name__, error)
    write_markdown(sweep_dir / "summary.md", rows, failures, overrides, len(jobs), notes)
    for note in notes:
        log.info("sweep summary: %s", note)
    return {"rows": rows, "records": records, "failures": failures, "overrides": overrides, "notes": notes, "files": files,
            "jobs": len(jobs)}
