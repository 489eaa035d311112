"""`python -m prospect.bench grid`: the sweep throughput of the 12-job strategy grid.

Runs the grid (`experiment=strategy_grid`, cache=false) through `python -m prospect.run -m`: sequential eager,
optimized with the GPU pool (`jobs_per_gpu` jobs per GPU) and, with --fused, as lanes of one process through
`hydra/launcher=fused`; it reports jobs per hour, the ratios and how often the lanes' replies equal the same
jobs run alone (the pool's); `--part` picks parts, `zoo_fused` times experiment=strategy_zoo as lanes. The
sweeps run in their own processes: this one only starts them and reads their folders. The report is written
after each part, so a bench stopped later keeps the parts it finished; a stop signal (SIGINT, SIGTERM, as
`timeout` sends) is forwarded to the running sweep, whose finished jobs are then counted (over the time
until the last of them ended), and no further part starts.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prospect.signals import SweepStop

log = logging.getLogger(__name__)

GRID_PARTS = ("sequential_eager", "concurrent_optimized", "fused", "zoo_fused")


def grid_parts(args) -> list[str]:
    """The parts `--part` names (default: sequential eager and the GPU pool, and the fused grid with --fused)."""
    if args.part in (None, "both"):
        return ["sequential_eager", "concurrent_optimized"] + (["fused"] if args.fused else [])
    if args.part == "all":
        return list(GRID_PARTS)
    parts = [part.strip() for part in args.part.split(",") if part.strip()]
    unknown = [part for part in parts if part not in GRID_PARTS]
    if unknown or not parts:
        raise ValueError(f"--part {args.part!r}: expected a comma-separated list of {', '.join(GRID_PARTS)}")
    return parts


def _sweep(name: str, command: list[str], folder: Path, stop: SweepStop) -> dict:
    """Run one sweep command; its wall time, jobs, ok jobs and mean ms per frame from the jobs' results.json;
    its output goes to FOLDER/sweep.log. The sweep runs in a session of its own, so a signal to the bench's
    process group (Ctrl-C, `timeout`) reaches it once, forwarded from `stop`; it then stops its jobs and exits.
    `stopped_by` names the signal, only the jobs that finished count, and jobs per hour run until the last of
    them ended."""
    started, started_at = time.perf_counter(), time.time()
    sweep = subprocess.Popen(command + [f"hydra.sweep.dir={folder}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    forwarded = 0  # a signal that came before the start is forwarded at once
    while True:
        try:
            stdout, stderr = sweep.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            for signum in stop.received[forwarded:]:
                sweep.send_signal(signum)
            forwarded = len(stop.received)
    wall = time.perf_counter() - started
    try:  # the sweep's own output, kept for a look afterwards; a log that cannot be written loses no result
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sweep.log").write_text(stdout + stderr)
    except OSError as error:
        log.warning("%s: cannot write %s (%s); its jobs' results still count", name, folder / "sweep.log", error.strerror or error)
    paths = list(folder.rglob("results.json"))
    documents = [json.loads(p.read_text()) for p in paths]
    stopped = bool(stop.received)
    if stopped:  # a stopped job's results say failed; the finished ones count, up to the last one's end
        finished = [(p, d) for p, d in zip(paths, documents) if d.get("status") == "ok" or d.get("cached")]
        documents = [d for _, d in finished]
        wall = max([p.stat().st_mtime - started_at for p, _ in finished], default=wall)
    elif sweep.returncode != 0 or not documents:
        log.error("%s exited with %d:\n%s", name, sweep.returncode, (stdout + stderr)[-3000:])
    computed = [d for d in documents if not d.get("cached")]
    times = [d["metrics"]["time_per_frame"] * 1000 for d in computed if d.get("metrics")]
    peaks = [d["metrics"].get("peak_memory_mb") for d in computed if (d.get("metrics") or {}).get("peak_memory_mb")]
    log.info("%s: %d jobs (%d computed) in %.0f s", name, len(documents), len(computed), wall)
    computed_ok = sum(d.get("status") == "ok" for d in computed)
    run = {"wall_s": wall, "started_at": started_at, "jobs": len(documents), "computed": len(computed), "ok": sum(d.get("status") == "ok" for d in documents),
           "exit_code": sweep.returncode, "jobs_per_hour": 3600 * computed_ok / wall,  # jobs computed and ok (not reused ones)
           "ms_per_frame": statistics.mean(times) if times else None, "peak_memory_mb": max(peaks) if peaks else None}
    if stopped:
        run["stopped_by"] = signal.Signals(stop.signum).name  # wall_s: until the last finished job ended
    return run


def time_split(folder: Path, started_at: float, wall_s: float) -> dict | None:
    """Where a fused sweep's wall time went (seconds), from fused/workers.json, the workers' logs and the lanes'
    traces: the sweep process before its first worker (Hydra, composing, checking and keying the jobs), the
    workers' model loading, streaming, the rest of the workers, and the sweep process after the last worker
    (collecting, the summary). The parts add up to the wall time when the workers run one after the other (one
    GPU); workers side by side on several GPUs are summed. None without workers.

    Streaming: per lane set (the lanes a worker runs together) its longest lane's frame steps, which hold every
    lane's reductions and summaries, as lanes step together; `summaries_s`: per lane set the most summary time
    of any lane. A worker runs its lane sets one after the other; they are told apart by the run start in their
    lanes' results.json (without those stamps, all the worker's lanes count as one set).

    The workers' rest is split by those stamps (`worker_rest_parts`, when every lane that ran has them; a reused
    result (`cached`) did not run here and is left out, trace and stamps): `start_s` from the
    worker process's start to its first run (Python, imports, reading and checking its jobs), `files_s` from
    each set's first results stamp to the next set's start or the worker's exit (the other lanes' scoring, every
    lane's results, plots and timelines), and `outside_frames_s` the remainder: within the runs but outside model
    loading and frame steps (the dataset, the prompt's step, the first lane's scoring, bookkeeping). Graph
    capture and compilation happen at a step's first use: in a frame step they count in streaming, in the
    prompt's step outside the frames."""
    path = folder / "fused" / "workers.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if r.get("started_at") and r.get("finished_at")]
    if not rows:
        return None
    workers_s = sum(r["finished_at"] - r["started_at"] for r in rows)
    loading = sum(float(m) for r in rows if Path(r["log"]).is_file()
                  for m in re.findall(r"model loaded in ([0-9.]+) s", Path(r["log"]).read_text()))
    streaming = summaries = start = files = 0.0
    stamped = True  # every lane that ran in every worker has its run's stamps
    for row in rows:
        ran = [lane for lane in map(_lane_times, map(Path, row.get("folders", []))) if lane is not None]
        sets = _lane_sets(ran)
        if sets is None:
            stamped, sets = False, [ran]
        else:
            ends = [min(lane.first_stamp for lane in lane_set) for lane_set in sets]
            nexts = [min(lane.run_start for lane in lane_set) for lane_set in sets[1:]] + [row["finished_at"]]
            start += min(lane.run_start for lane in sets[0]) - row["started_at"]
            files += sum(following - end for following, end in zip(nexts, ends))
        for lane_set in sets:
            streaming += max((lane.frames_s for lane in lane_set), default=0.0)
            summaries += max((lane.summaries_s for lane in lane_set), default=0.0)
    rest = workers_s - loading - streaming
    split = {"before_first_worker_s": min(r["started_at"] for r in rows) - started_at, "model_loading_s": loading,
             "streaming_s": streaming, "summaries_s": summaries, "worker_rest_s": rest,
             "after_last_worker_s": started_at + wall_s - max(r["finished_at"] for r in rows)}
    if stamped:
        split["worker_rest_parts"] = {"start_s": start, "outside_frames_s": rest - start - files, "files_s": files}
    return split


@dataclass
class _LaneTimes:
    frames_s: float  # its frame steps (trace.jsonl)
    summaries_s: float  # of which its summaries
    run_start: float | None  # its run's start and results stamp (results.json), None without them
    first_stamp: float | None


def _lane_times(job_folder: Path) -> _LaneTimes | None:
    """A lane's times from its trace and results.json; None for a reused result (its files come from another run)."""
    results = job_folder / "results.json"
    document = json.loads(results.read_text()) if results.is_file() else {}
    if document.get("cached"):
        return None
    trace = job_folder / "trace.jsonl"
    records = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()] if trace.is_file() else []
    stamps = (document.get("started_at"), document.get("finished_at")) if document.get("started_at") and document.get("finished_at") else (None, None)
    return _LaneTimes(sum(r.get("wall_ms", 0.0) for r in records) / 1000, sum(r.get("summary_ms", 0.0) for r in records) / 1000, *stamps)


def _lane_sets(lanes: list[_LaneTimes], gap_s: float = 0.5) -> list[list[_LaneTimes]] | None:
    """The lanes grouped by run (the lanes of one run start within moments of each other; the next run starts
    after the previous one ended), in order; None when a lane has no stamps or there is none."""
    if not lanes or any(lane.run_start is None for lane in lanes):
        return None
    sets: list[list[_LaneTimes]] = []
    for lane in sorted(lanes, key=lambda lane: lane.run_start):
        if sets and lane.run_start - sets[-1][-1].run_start <= gap_s:
            sets[-1].append(lane)
        else:
            sets.append([lane])
    return sets


def _fused_workers(folder: Path) -> list[dict]:
    """The fused launcher's workers (fused/workers.json): lanes and seconds from process start to exit."""
    path = folder / "fused" / "workers.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    return [{"worker": r["worker"], "lanes": len(r["jobs"]),
             "seconds": (r["finished_at"] - r["started_at"]) if r.get("finished_at") and r.get("started_at") else None} for r in rows]


def _replies_by_job(folder: Path) -> dict[str, dict[tuple[str, int], str]]:
    """{job key: {(conversation, frame): reply}} of a sweep folder's jobs (jobs sharing a key count once)."""
    found = {}
    for path in folder.glob("*/predictions.json"):
        results = path.parent / "results.json"
        key = json.loads(results.read_text()).get("job_key") if results.is_file() else None
        if key:
            document = json.loads(path.read_text())
            found[key] = {(c["id"], f["index"]): f["gen"] for c in document.get("conversations", []) for f in c["frames"] if f["gen"]}
    return found


def reply_agreement(lanes: Path, alone: Path) -> dict:
    """How often a fused lane's replies equal the same job's run alone (the GPU pool's optimized jobs): the
    share of reply frames with the same text, over the jobs (by job key) both sweeps hold."""
    mine, theirs = _replies_by_job(lanes), _replies_by_job(alone)
    same = total = 0
    per_job = {}
    for job in sorted(set(mine) & set(theirs)):
        frames = set(mine[job]) | set(theirs[job])
        equal = sum(mine[job].get(f) == theirs[job].get(f) for f in frames)
        per_job[job] = f"{equal}/{len(frames)}"
        same, total = same + equal, total + len(frames)
    return {"equal_replies": same, "replies": total, "rate": same / total if total else None, "per_job": per_job}


def grid_commands(args, root: Path, keep_lens: tuple[str, ...]) -> dict[str, list[str]]:
    """The `python -m prospect.run -m` command of each part (without its hydra.sweep.dir)."""
    base = [sys.executable, "-m", "prospect.run", "-m", f"model={args.model}", "model.random_init=true",
            "logger=none", "eval=none", f"dataset.generate.seconds={args.seconds}",
            f"stream.max_new_tokens={args.reply_tokens}", f"stream.min_new_tokens={args.reply_tokens}"]
    if getattr(args, "summary_tokens", None):  # summarize_and_drop's summaries capped (the other strategies ignore the key)
        base.append(f"++strategy.summary_max_new_tokens={args.summary_tokens}")
    grid = [*base, "experiment=strategy_grid", "cache=false"]
    eager_grid = ["strategy=none,drop_all,drop_middle,summarize_and_drop", f"strategy.last_keep_len={','.join(keep_lens)}"]
    return {
        "sequential_eager": grid + ["stream.optimized=false", "stream.vision_batch_size=1", *eager_grid],
        "concurrent_optimized": grid + ["stream.optimized=true", "hydra/launcher=gpu_pool", f"hydra.launcher.jobs_per_gpu={args.jobs_per_gpu}"],
        "fused": grid + ["hydra/launcher=fused", f"hydra.launcher.lanes_per_gpu={args.lanes_per_gpu}"],
        # the result cache on (the zoo's shared keys run once), rooted in this run's fresh folder: every distinct job computed
        "zoo_fused": [*base, "experiment=strategy_zoo", "hydra/launcher=fused", f"hydra.launcher.lanes_per_gpu={args.zoo_lanes_per_gpu}",
                      f"cache_root={root / 'zoo_fused'}"],
    }


def run_grid(args) -> dict:
    """The 12-job grid: sequential eager, optimized through the GPU pool, and (--fused) as lanes through the
    fused launcher; `zoo_fused` times every distinct job of experiment=strategy_zoo as lanes."""
    import torch  # lazy: only for the GPU's name; the sweeps load torch in their own processes

    # a fresh folder per bench run (earlier runs stay): no earlier job is counted or reused
    root = Path(args.grid_dir) / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    keep_lens = ("512", "256", "1024")[: max(1, min(3, args.eager_jobs // 4))]
    commands = grid_commands(args, root, keep_lens)
    runs = {}
    report = {"grid": runs, "grid_dir": str(root), "model": args.model, "seconds": args.seconds, "reply_tokens": args.reply_tokens,
              "summary_tokens": getattr(args, "summary_tokens", None) or 512,
              "jobs_per_gpu": args.jobs_per_gpu, "lanes_per_gpu": args.lanes_per_gpu,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "note": "sequential eager ran the 4 strategies at last_keep_len " + ",".join(keep_lens) + " (jobs per hour compared)"}
    stop = SweepStop().install()  # from here a stop signal ends the bench after the part in progress
    try:
        for name in grid_parts(args):
            folder = root / name
            runs[name] = _sweep(name, commands[name], folder, stop)
            if name in ("fused", "zoo_fused"):
                runs[name]["workers"] = _fused_workers(folder)
                runs[name]["time_split"] = time_split(folder, runs[name]["started_at"], runs[name]["wall_s"])
            args.out.write_text(json.dumps({**report, "partial": True}, indent=1) + "\n")  # the parts so far
            if stop.received:
                report["stopped_by"] = signal.Signals(stop.signum).name
                break
    finally:
        stop.uninstall()
    ratios = {}
    for faster, slower in (("concurrent_optimized", "sequential_eager"), ("fused", "sequential_eager"), ("fused", "concurrent_optimized")):
        if faster in runs and slower in runs and runs[slower]["jobs_per_hour"]:
            ratios[f"{faster}/{slower}"] = runs[faster]["jobs_per_hour"] / runs[slower]["jobs_per_hour"]
    report["ratios"] = ratios
    if "fused" in runs and "concurrent_optimized" in runs:
        report["lane_agreement"] = reply_agreement(root / "fused", root / "concurrent_optimized")
    return report


def format_grid(report: dict) -> str:
    """The grid report as docs/performance.md's "Sweep throughput" table."""
    names = {"sequential_eager": "sequential eager", "concurrent_optimized": f"GPU pool, {report['jobs_per_gpu']} jobs per GPU",
             "fused": "fused lanes (hydra/launcher=fused)", "zoo_fused": "strategy_zoo, fused"}
    lines = [f"{report['model']} random-init, {report['seconds']:g} s video, {report['reply_tokens']}-token replies, "
             f"summaries of up to {report.get('summary_tokens', 512)} tokens, GPU: {report['gpu']}", "",
             "| sweep | jobs (computed) | ok | wall s | computed jobs/hour | ms/frame per job | peak MB |", "|---|---|---|---|---|---|---|"]
    for name, run in report["grid"].items():
        ms = f"{run['ms_per_frame']:.1f}" if run["ms_per_frame"] is not None else "-"
        peak = f"{run['peak_memory_mb']:.0f}" if run.get("peak_memory_mb") else "-"
        lines.append(f"| {names[name]} | {run['jobs']} ({run['computed']}) | {run['ok']} | {run['wall_s']:.0f} | {run['jobs_per_hour']:.0f} | {ms} | {peak} |")
    lines.append("")
    if report.get("stopped_by"):
        lines += [f"stopped by {report['stopped_by']}: the stopped part counts its finished jobs over the time until the last of "
                  "them ended; no later part ran", ""]
    for name, run in report["grid"].items():
        split = run.get("time_split")
        if split:
            lines.append(f"{names[name]}, where the {run['wall_s']:.0f} s went: " + ", ".join(
                f"{label} {split[key]:.1f} s" for key, label in (
                    ("before_first_worker_s", "sweep process before the worker"), ("model_loading_s", "model loading"),
                    ("streaming_s", "streaming (longest lane)"), ("summaries_s", "of which summaries"),
                    ("worker_rest_s", "worker's rest (start-up, outside the frame steps, files)"),
                    ("after_last_worker_s", "sweep process after the worker (summary)"))))
            parts = split.get("worker_rest_parts")
            if parts:
                lines.append(f"  the worker's rest: start-up (process, imports, its jobs) {parts['start_s']:.1f} s, in its run outside "
                             f"model loading and frame steps {parts['outside_frames_s']:.1f} s, results and files {parts['files_s']:.1f} s")
    lines += [f"{ratio}: {value:.1f}x" for ratio, value in report["ratios"].items()]
    agreement = report.get("lane_agreement")
    if agreement and agreement["replies"]:
        lines.append(f"fused lanes' replies equal to the same job run alone (GPU pool): {agreement['equal_replies']}/{agreement['replies']} "
                     f"({100 * agreement['rate']:.0f}%)")
    return "\n".join(lines)
