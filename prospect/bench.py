"""`python -m prospect.bench`: the eager reference path against the optimized path, in the same run.

    python -m prospect.bench [--model smolvlm2_2b] [--seconds 230] [--turns 39] [--reply-tokens 30] [--out bench.json]
    python -m prospect.bench grid [--fused] [--jobs-per-gpu 4] [--lanes-per-gpu 12] [--part PARTS] [--out grid.json]
    python -m prospect.bench zoo [--model smolvlm2_2b] [--seconds 230] [--last-keep 512] [--out zoo.json]

The first form builds the model with random weights (no download), streams one synthetic video
(seconds * fps + 1 frames, `turns` evenly spaced reference turns, replies of exactly `reply-tokens`
tokens) under drop_middle 4096/128/512, once per path after a short warm-up, and prints ms per frame
(whole run), vision ms per frame, frame prefill ms, decode ms per token, peak memory, the eager/optimized
ratio and how often the two paths' greedy replies agree. Both paths run without the stream's measurements
(as before they existed); the optimized path then runs twice more in the same process, with the
teacher-forced reference scores on and with the reference scores and the speak probe on (the defaults of a
run), and the cost of each is printed as a ratio to the optimized run without them, with how many of its
greedy replies equal the optimized run's. On a GPU in bf16 two optimized runs of one stream need not agree
(kernels chosen under CUDA-graph capture round differently; random weights have near-flat logits), so a
second optimized run without measurements gives that floor (on the CPU every run agrees). The second form runs the 12-job strategy grid
(`experiment=strategy_grid`, cache=false) through `python -m prospect.run -m`: sequential eager, optimized
with the GPU pool (`jobs_per_gpu` jobs per GPU) and, with --fused, as lanes of one process through
`hydra/launcher=fused`; it prints jobs per hour, the ratios and how often the lanes' replies equal the
same jobs run alone (the pool's); `--part` picks parts, `zoo_fused` times experiment=strategy_zoo as lanes.
The third streams the same video under
each of the ten bounded strategies on the default path (one model, loaded once) and reports ms per frame
and ms per reduction (synchronized, at the strategy's threshold of max_seq_len - reserved tokens). All
write JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class DrawnFrames:
    """Frames of a synthetic workbench video, drawn when asked for (see prospect.data.synthetic)."""

    def __init__(self, seconds: float, fps: float, seed: int = 0):
        from prospect.data.synthetic import plan_video

        self.plan = plan_video(0, seconds, fps, random.Random(seed))

    def image(self, original_index: int):
        from prospect.data.synthetic import draw_frame

        return draw_frame(self.plan, min(original_index, self.plan.num_frames - 1))


def bench_conversation(seconds: float, fps: float, turns: int, frames: int | None = None):
    """A conversation of seconds * fps + 1 frames with `turns` evenly spaced reference turns."""
    from prospect.data.types import Conversation, StreamFrame, Turn

    count = frames or int(seconds * fps) + 1
    source = DrawnFrames(seconds, fps)
    steps = source.plan.task.steps
    due = {round((i + 1) * count / (turns + 1)) for i in range(turns)}
    stream = []
    for k in range(count):
        before = (Turn("user", f"I want to do this: {source.plan.task.request}.", k / fps),) if k == 2 else ()
        reference = f"Now, {steps[len(stream) % len(steps)].lower()}." if k in due else None
        stream.append(StreamFrame(k, k, (k + 1) / fps, before, reference))
    return Conversation(
        id=f"bench/{count}f", video_uid="bench", subset="synthetic", user_type="bench", fps=fps,
        system_prompt="You are a proactive assistant. Watch the user and guide them step by step.",
        task_goal=source.plan.task.goal, knowledge="", add_knowledge=False, frames=stream, frame_source=source,
    )


def _peak_mb(device: torch.device) -> float:
    from prospect.stream.runner import peak_memory_mb

    return peak_memory_mb(device)


# (name, path, reference scores, speak probe): the paths without measurements, then the optimized path with them
RUNS = (("eager", False, False, False), ("optimized", True, False, False), ("optimized_again", True, False, False),
        ("optimized+reference_scores", True, True, False), ("optimized+reference_scores+speak_probe", True, True, True))


def measure(model, conversation, warmup, optimized: bool, args, reference_scores: bool = False,
            speak_probe: bool = False) -> tuple[dict, dict[int, str]]:
    """Stream `conversation` on one path (after `warmup` on the same runner); figures from its trace."""
    from prospect.context_strategies import DropMiddle
    from prospect.stream.runner import StreamRunner
    from prospect.stream.settings import StreamSettings

    settings = StreamSettings(
        max_new_tokens=args.reply_tokens, min_new_tokens=args.reply_tokens, optimized=optimized,
        vision_batch_size=args.vision_batch if optimized else 1, reference_scores=reference_scores, speak_probe=speak_probe,
    )
    strategy = DropMiddle(max_seq_len=args.max_seq_len, reserved_seq_len=args.reserved, last_keep_len=args.last_keep)
    runner = StreamRunner(model, strategy, settings)
    runner.run(warmup)
    device = model.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = runner.run(conversation)
    wall = time.perf_counter() - started
    trace = result.trace
    tokens = sum(r["generated_tokens"] for r in trace)
    figures = {
        "frames": len(trace),
        "replies": len(result.replies),
        "ms_per_frame": 1000 * wall / len(trace),
        "vision_ms_per_frame": sum(r["vision_ms"] for r in trace) / len(trace),
        "frame_prefill_ms": statistics.median(r["frame_prefill_ms"] for r in trace),
        "decode_ms_per_token": sum(r["decode_ms"] for r in trace) / tokens if tokens else 0.0,
        "peak_memory_mb": _peak_mb(device),
        "compressions": sum("compress" in r["events"] for r in trace),
        "max_cache": max(r["cache_max"] for r in trace),
        "graphs_captured": runner.static.graphs_captured if runner.static is not None else 0,
        "score_ms_per_frame": sum(r.get("score_ms", 0.0) for r in trace) / len(trace),
        "probe_ms_per_frame": sum(r.get("probe_ms", 0.0) for r in trace) / len(trace),
        "references_scored": sum("ref_nll" in r for r in trace),
        "frames_probed": sum("speak_probability" in r for r in trace),
    }
    return figures, result.replies


def run_bench(args) -> dict:
    from prospect.models.vlm import load_model
    from prospect.tracking.results import environment
    from prospect.validation import compose_config

    cfg = compose_config([f"model={args.model}", "model.random_init=true", f"model.device={args.device}", f"model.dtype={args.dtype}"])
    model = load_model(cfg.model, cfg.paths.cache_dir)
    conversation = bench_conversation(args.seconds, args.fps, args.turns)
    warmup = bench_conversation(args.seconds, args.fps, 2, frames=24)
    results = {}
    replies = {}
    paths = args.paths.split(",")
    for name, optimized, reference_scores, speak_probe in RUNS:
        if (name.split("+")[0].removesuffix("_again") not in paths) or (name != "eager" and name != "optimized" and not args.measurements):
            continue
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(model.device)
        results[name], replies[name] = measure(model, conversation, warmup, optimized, args, reference_scores, speak_probe)
        log.info("%s: %.1f ms/frame", name, results[name]["ms_per_frame"])
    if not {"eager", "optimized"} <= set(results):
        return {"partial": results}
    common = sorted(set(replies["eager"]) & set(replies["optimized"]))
    same = sum(replies["eager"][i] == replies["optimized"][i] for i in common)
    env = environment(str(model.device))
    measured = {name: {**results[name], "ratio_to_optimized": results[name]["ms_per_frame"] / results["optimized"]["ms_per_frame"],
                       "reply_agreement_with_optimized": _agreement(replies[name], replies["optimized"])}
                for name, *_ in RUNS[2:] if name in results}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": env["device_name"], "torch": env["torch"], "transformers": env["transformers"], "git_commit": env["git_commit"],
        "model": args.model, "dtype": str(model.dtype).removeprefix("torch."),
        "video": {"frames": conversation.num_frames, "reference_turns": len(conversation.references), "reply_tokens": args.reply_tokens},
        "strategy": f"drop_middle {args.max_seq_len}/{args.reserved}/{args.last_keep}",
        "eager": results["eager"], "optimized": results["optimized"],
        "ratio_eager_over_optimized": results["eager"]["ms_per_frame"] / results["optimized"]["ms_per_frame"],
        "reply_agreement": same / len(common) if common else 0.0, "replies_compared": len(common),
        "measurements": measured,
    }


def _agreement(replies: dict[int, str], reference: dict[int, str]) -> float:
    """The share of `reference`'s replies that `replies` has identical, at the same frame."""
    return sum(replies.get(index) == text for index, text in reference.items()) / len(reference) if reference else 1.0


def format_bench(report: dict) -> str:
    rows = [("", "eager", "optimized", "eager/optimized")]
    for key, label in (("ms_per_frame", "ms per frame (whole run)"), ("vision_ms_per_frame", "vision ms per frame"),
                       ("frame_prefill_ms", "frame prefill ms (median)"), ("decode_ms_per_token", "decode ms per token"),
                       ("peak_memory_mb", "peak memory MB")):
        eager, fast = report["eager"][key], report["optimized"][key]
        rows.append((label, f"{eager:.2f}", f"{fast:.2f}", f"{eager / fast:.2f}x" if fast else "-"))
    width = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = [f"{report['model']} ({report['dtype']}) on {report['device']}, torch {report['torch']}, transformers "
             f"{report['transformers']}, {report['date']}",
             f"video: {report['video']['frames']} frames, {report['video']['reference_turns']} reference turns, replies of "
             f"{report['video']['reply_tokens']} tokens; {report['strategy']}"]
    lines += ["  ".join(cell.ljust(width[c]) if c == 0 else cell.rjust(width[c]) for c, cell in enumerate(row)) for row in rows]
    lines.append(f"greedy replies identical on both paths: {report['reply_agreement']:.1%} of {report['replies_compared']}")
    for name, figures in report.get("measurements", {}).items():
        lines.append(f"{name}: {figures['ms_per_frame']:.2f} ms per frame = {figures['ratio_to_optimized']:.3f}x optimized "
                     f"({figures['references_scored']} references scored, {figures['frames_probed']} frames probed; scoring "
                     f"{figures['score_ms_per_frame']:.3f} + probing {figures['probe_ms_per_frame']:.3f} ms per frame; "
                     f"{figures['reply_agreement_with_optimized']:.0%} of the replies identical to the optimized run's)")
    return "\n".join(lines)


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


def _sweep(name: str, command: list[str], folder: Path) -> dict:
    """Run one sweep command; its wall time, jobs, ok jobs and mean ms per frame from the jobs' results.json."""
    started = time.perf_counter()
    done = subprocess.run(command + [f"hydra.sweep.dir={folder}"], capture_output=True, text=True)
    wall = time.perf_counter() - started
    documents = [json.loads(p.read_text()) for p in folder.rglob("results.json")]
    if done.returncode != 0 or not documents:
        log.error("%s exited with %d:\n%s", name, done.returncode, (done.stdout + done.stderr)[-3000:])
    computed = [d for d in documents if not d.get("cached")]
    times = [d["metrics"]["time_per_frame"] * 1000 for d in computed if d.get("metrics")]
    peaks = [d["metrics"].get("peak_memory_mb") for d in computed if (d.get("metrics") or {}).get("peak_memory_mb")]
    log.info("%s: %d jobs (%d computed) in %.0f s", name, len(documents), len(computed), wall)
    computed_ok = sum(d.get("status") == "ok" for d in computed)
    return {"wall_s": wall, "jobs": len(documents), "computed": len(computed), "ok": sum(d.get("status") == "ok" for d in documents),
            "exit_code": done.returncode, "jobs_per_hour": 3600 * computed_ok / wall,  # jobs computed and ok (not reused ones)
            "ms_per_frame": statistics.mean(times) if times else None, "peak_memory_mb": max(peaks) if peaks else None}


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


def run_grid(args) -> dict:
    """The 12-job grid: sequential eager, optimized through the GPU pool, and (--fused) as lanes through the
    fused launcher; `zoo_fused` times every distinct job of experiment=strategy_zoo as lanes."""
    base = [sys.executable, "-m", "prospect.run", "-m", f"model={args.model}", "model.random_init=true",
            "logger=none", "eval=none", f"dataset.generate.seconds={args.seconds}",
            f"stream.max_new_tokens={args.reply_tokens}", f"stream.min_new_tokens={args.reply_tokens}"]
    grid = [*base, "experiment=strategy_grid", "cache=false"]
    # a fresh folder per bench run (earlier runs stay): no earlier job is counted or reused
    root = Path(args.grid_dir) / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    keep_lens = ("512", "256", "1024")[: max(1, min(3, args.eager_jobs // 4))]
    eager_grid = ["strategy=none,drop_all,drop_middle,summarize_and_drop", f"strategy.last_keep_len={','.join(keep_lens)}"]
    commands = {
        "sequential_eager": grid + ["stream.optimized=false", "stream.vision_batch_size=1", *eager_grid],
        "concurrent_optimized": grid + ["stream.optimized=true", "hydra/launcher=gpu_pool", f"hydra.launcher.jobs_per_gpu={args.jobs_per_gpu}"],
        "fused": grid + ["hydra/launcher=fused", f"hydra.launcher.lanes_per_gpu={args.lanes_per_gpu}"],
        # the result cache on (the zoo's shared keys run once), rooted in this run's fresh folder: every distinct job computed
        "zoo_fused": [*base, "experiment=strategy_zoo", "hydra/launcher=fused", f"hydra.launcher.lanes_per_gpu={args.zoo_lanes_per_gpu}",
                      f"cache_root={root / 'zoo_fused'}"],
    }
    runs = {}
    for name in grid_parts(args):
        folder = root / name
        runs[name] = _sweep(name, commands[name], folder)
        if name in ("fused", "zoo_fused"):
            runs[name]["workers"] = _fused_workers(folder)
    report = {"grid": runs, "grid_dir": str(root), "model": args.model, "seconds": args.seconds, "reply_tokens": args.reply_tokens,
              "jobs_per_gpu": args.jobs_per_gpu, "lanes_per_gpu": args.lanes_per_gpu,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "note": "sequential eager ran the 4 strategies at last_keep_len " + ",".join(keep_lens) + " (jobs per hour compared)"}
    ratios = {}
    for faster, slower in (("concurrent_optimized", "sequential_eager"), ("fused", "sequential_eager"), ("fused", "concurrent_optimized")):
        if faster in runs and slower in runs and runs[slower]["jobs_per_hour"]:
            ratios[f"{faster}/{slower}"] = runs[faster]["jobs_per_hour"] / runs[slower]["jobs_per_hour"]
    report["ratios"] = ratios
    if "fused" in runs and "concurrent_optimized" in runs:
        report["lane_agreement"] = reply_agreement(root / "fused", root / "concurrent_optimized")
    return report


def format_grid(report: dict) -> str:
    """The grid report as the README's table."""
    names = {"sequential_eager": "sequential eager", "concurrent_optimized": f"GPU pool, {report['jobs_per_gpu']} jobs per GPU",
             "fused": "fused lanes (hydra/launcher=fused)", "zoo_fused": "strategy_zoo, fused"}
    lines = [f"{report['model']} random-init, {report['seconds']:g} s video, {report['reply_tokens']}-token replies, GPU: {report['gpu']}", "",
             "| sweep | jobs (computed) | ok | wall s | computed jobs/hour | ms/frame per job | peak MB |", "|---|---|---|---|---|---|---|"]
    for name, run in report["grid"].items():
        ms = f"{run['ms_per_frame']:.1f}" if run["ms_per_frame"] is not None else "-"
        peak = f"{run['peak_memory_mb']:.0f}" if run.get("peak_memory_mb") else "-"
        lines.append(f"| {names[name]} | {run['jobs']} ({run['computed']}) | {run['ok']} | {run['wall_s']:.0f} | {run['jobs_per_hour']:.0f} | {ms} | {peak} |")
    lines.append("")
    lines += [f"{ratio}: {value:.1f}x" for ratio, value in report["ratios"].items()]
    agreement = report.get("lane_agreement")
    if agreement and agreement["replies"]:
        lines.append(f"fused lanes' replies equal to the same job run alone (GPU pool): {agreement['equal_replies']}/{agreement['replies']} "
                     f"({100 * agreement['rate']:.0f}%)")
    return "\n".join(lines)


ZOO_STRATEGIES = ("none", "drop_all", "drop_middle", "summarize_and_drop", "streaming_llm", "drop_frames", "frame_coverage",
                  "tar_van", "key_norm", "snapkv")


def zoo_strategies(args) -> dict:
    """The strategies `--strategies` names, built before anything loads; ValueError names the culprit."""
    from prospect.context_strategies import create_strategy

    built = {}
    for name in args.strategies.split(","):
        try:
            built[name] = create_strategy(name, max_seq_len=args.max_seq_len, reserved_seq_len=args.reserved, last_keep_len=args.last_keep)
        except ValueError as error:
            raise ValueError(f"--strategies {name}: {error}") from None
    return built


def run_zoo(args) -> dict:
    """Each bounded strategy streams the bench video once (after a warm-up): ms per frame, per reduction.
    A strategy that fails is recorded with its error; the others still run."""
    from prospect.models.vlm import load_model
    from prospect.stream.runner import StreamRunner, _synchronize
    from prospect.stream.settings import StreamSettings
    from prospect.tracking.results import environment
    from prospect.validation import compose_config

    strategies = zoo_strategies(args)
    cfg = compose_config([f"model={args.model}", "model.random_init=true", f"model.device={args.device}", f"model.dtype={args.dtype}"])
    model = load_model(cfg.model, cfg.paths.cache_dir)
    conversation = bench_conversation(args.seconds, args.fps, args.turns)
    warmup = bench_conversation(args.seconds, args.fps, 2, frames=24)
    settings = StreamSettings(max_new_tokens=args.reply_tokens, min_new_tokens=args.reply_tokens, vision_batch_size=args.vision_batch)
    rows = {}
    for name, strategy in strategies.items():
        try:
            runner = StreamRunner(model, strategy, settings)
            runner.run(warmup)
            _synchronize(model.device)
            started = time.perf_counter()
            trace = runner.run(conversation).trace
            wall = time.perf_counter() - started
        except Exception as error:  # recorded; the other strategies still run
            rows[name] = {"error": f"{type(error).__name__}: {error}"}
            log.error("%s failed: %s", name, rows[name]["error"])
            continue
        reductions = [r for record in trace for r in record.get("reductions", [])]
        reduce_ms = sum(record["reduce_ms"] for record in trace)
        rows[name] = {
            "ms_per_frame": 1000 * wall / len(trace), "reductions": len(reductions),
            "ms_per_reduction": reduce_ms / len(reductions) if reductions else 0.0,
            "tokens_before_reduction": statistics.mean(r["before"] for r in reductions) if reductions else 0,
            "tokens_after_reduction": statistics.mean(r["after"] for r in reductions) if reductions else 0,
            "max_cache": max(record["cache_max"] for record in trace),
            "frame_share": statistics.mean(r["cache_frame_tokens"] / max(1, r["cache_after"]) for r in trace),
        }
        log.info("%s: %.2f ms/frame, %.2f ms per reduction", name, rows[name]["ms_per_frame"], rows[name]["ms_per_reduction"])
        del runner
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
    env = environment(str(model.device))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": env["device_name"],
        "torch": env["torch"], "transformers": env["transformers"], "git_commit": env["git_commit"], "model": args.model,
        "dtype": str(model.dtype).removeprefix("torch."),
        "video": {"frames": conversation.num_frames, "reference_turns": len(conversation.references), "reply_tokens": args.reply_tokens},
        "budget": f"{args.max_seq_len}/{args.reserved}, last_keep_len {args.last_keep}", "strategies": rows,
    }


def format_zoo(report: dict) -> str:
    lines = [f"{report['model']} ({report['dtype']}) on {report['device']}, {report['date']}; {report['video']['frames']} frames, "
             f"{report['video']['reference_turns']} replies of {report['video']['reply_tokens']} tokens; {report['budget']}",
             f"{'strategy':20} {'ms/frame':>9} {'reductions':>10} {'ms/reduction':>12} {'tokens before->after':>21} {'frame share':>11}"]
    for name, row in report["strategies"].items():
        if "error" in row:
            lines.append(f"{name:20} FAILED: {row['error']}")
            continue
        lines.append(f"{name:20} {row['ms_per_frame']:9.2f} {row['reductions']:10d} {row['ms_per_reduction']:12.2f} "
                     f"{row['tokens_before_reduction']:10.0f}->{row['tokens_after_reduction']:<10.0f} {row['frame_share']:11.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prospect.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=("stream", "grid", "zoo"), default="stream")
    parser.add_argument("--strategies", default=",".join(ZOO_STRATEGIES), help="zoo: the strategies to time")
    parser.add_argument("--model", default="smolvlm2_2b", help="a model config name (built with random weights)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seconds", type=float, default=230)
    parser.add_argument("--fps", type=float, default=2)
    parser.add_argument("--turns", type=int, default=39)
    parser.add_argument("--reply-tokens", type=int, default=30)
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--reserved", type=int, default=128)
    parser.add_argument("--last-keep", type=int, default=512)
    parser.add_argument("--vision-batch", type=int, default=8)
    parser.add_argument("--paths", default="eager,optimized", help="which paths to run (both for the comparison)")
    parser.add_argument("--no-measurements", dest="measurements", action="store_false",
                        help="stream: skip the optimized runs with reference scores and the speak probe")
    parser.add_argument("--eager-jobs", type=int, default=12, help="grid: run only the first N jobs of the sequential eager sweep")
    parser.add_argument("--jobs-per-gpu", type=int, default=4)
    parser.add_argument("--grid-dir", default="multirun/bench_grid", help="grid: each run's sweeps go to a new DATE_TIME folder in it")
    parser.add_argument("--fused", action="store_true", help="grid: also run the grid as lanes (hydra/launcher=fused)")
    parser.add_argument("--lanes-per-gpu", type=int, default=12, help="grid: the fused launcher's lanes_per_gpu")
    parser.add_argument("--zoo-lanes-per-gpu", type=int, default=24, help="grid: lanes_per_gpu for the zoo_fused part")
    parser.add_argument("--part", default=None,
                        help=f"grid: the parts to run, comma-separated, of {', '.join(GRID_PARTS)}, or all (default: the first "
                             "two, and fused with --fused); for machines that limit one command's time")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: bench.json or grid.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = {"--eager-jobs": args.eager_jobs, "--jobs-per-gpu": args.jobs_per_gpu, "--lanes-per-gpu": args.lanes_per_gpu,
              "--zoo-lanes-per-gpu": args.zoo_lanes_per_gpu}
    bad = next((f"{name} {value}" for name, value in counts.items() if value < 1), None)
    if bad:
        print(f"prospect.bench: error: {bad}: must be at least 1", file=sys.stderr)
        return 2
    if args.turns < 1 or args.reply_tokens < 1 or args.seconds <= 0:
        print("prospect.bench: error: --turns, --reply-tokens and --seconds must be positive", file=sys.stderr)
        return 2
    if args.mode == "grid":
        try:
            grid_parts(args)
        except ValueError as error:
            print(f"prospect.bench: error: {error}", file=sys.stderr)
            return 2
        report = run_grid(args)
        text = format_grid(report)
    elif args.mode == "zoo":
        try:
            zoo_strategies(args)
        except ValueError as error:
            print(f"prospect.bench: error: {error}", file=sys.stderr)
            return 2
        report = run_zoo(args)
        text = format_zoo(report)
    else:
        report = run_bench(args)
        text = format_bench(report) if "partial" not in report else json.dumps(report, indent=1)
    out = args.out or Path({"grid": "grid.json", "zoo": "zoo.json"}.get(args.mode, "bench.json"))
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
