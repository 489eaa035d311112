"""`python -m prospect.bench` (mode `stream`): one stream on the eager path against the optimized path.

Builds the model with random weights (no download), streams one synthetic video (seconds * fps + 1 frames,
`turns` evenly spaced reference turns, replies of exactly `reply-tokens` tokens) under drop_middle
4096/128/512, once per path after a short warm-up, and reports ms per frame (whole run), vision ms per frame,
frame prefill ms, decode ms per token, peak memory, the eager/optimized ratio and how often the two paths'
greedy replies agree. Both paths run without the stream's measurements (as before they existed); the
optimized path then runs twice more in the same process, with the teacher-forced reference scores on and
with the reference scores and the speak probe on (the defaults of a run), and the cost of each is reported as
a ratio to the optimized run without them, with how many of its greedy replies equal the optimized run's. On
a GPU in bf16 two optimized runs of one stream need not agree (kernels chosen under CUDA-graph capture round
differently; random weights have near-flat logits), so a second optimized run without measurements gives
that floor (on the CPU every run agrees). The optimized path also runs uncompiled (stream.compile=false) before
the compiled run (stream.compile=auto: on CUDA), for decode ms per token, frame prefill and ms per frame with and
without torch.compile, and the compilation's one-time cost (the difference of the two runs' warm-ups).
"""

from __future__ import annotations

import json
import logging
import statistics
import time

import torch

from prospect.bench.common import bench_model, bench_videos, report_header
from prospect.context_strategies import DropMiddle
from prospect.stream.feed import peak_memory_mb, synchronize
from prospect.stream.runner import StreamRunner
from prospect.stream.settings import StreamSettings

log = logging.getLogger(__name__)

# (name, path, reference scores, speak probe, compile): the paths without measurements (the optimized path
# uncompiled first: the compiled run's warm-up then pays the process's compilation), then the optimized path with them
RUNS = (("eager", False, False, False, False), ("optimized_uncompiled", True, False, False, False),
        ("optimized", True, False, False, "auto"), ("optimized_again", True, False, False, "auto"),
        ("optimized+reference_scores", True, True, False, "auto"), ("optimized+reference_scores+speak_probe", True, True, True, "auto"))


def measure(model, conversation, warmup, optimized: bool, args, reference_scores: bool = False,
            speak_probe: bool = False, compile: bool | str = "auto") -> tuple[dict, dict[int, str]]:
    """Stream `conversation` on one path (after `warmup` on the same runner, timed: graph capture and, on the first
    compiled run of the process, compilation); figures from its trace."""
    settings = StreamSettings(
        max_new_tokens=args.reply_tokens, min_new_tokens=args.reply_tokens, optimized=optimized,
        vision_batch_size=args.vision_batch if optimized else 1, reference_scores=reference_scores, speak_probe=speak_probe,
        compile=compile,
    )
    strategy = DropMiddle(max_seq_len=args.max_seq_len, reserved_seq_len=args.reserved, last_keep_len=args.last_keep)
    runner = StreamRunner(model, strategy, settings)
    device = model.device
    synchronize(device)
    started = time.perf_counter()
    runner.run(warmup)
    synchronize(device)
    warmup_s = time.perf_counter() - started
    synchronize(device)
    started = time.perf_counter()
    result = runner.run(conversation)
    wall = time.perf_counter() - started
    trace = result.trace
    tokens = sum(r["generated_tokens"] for r in trace)
    figures = {
        "compiled": runner.static is not None and runner.static.compiled is not None,
        "warmup_s": warmup_s,
        "frames": len(trace),
        "replies": len(result.replies),
        "ms_per_frame": 1000 * wall / len(trace),
        "vision_ms_per_frame": sum(r["vision_ms"] for r in trace) / len(trace),
        "frame_prefill_ms": statistics.median(r["frame_prefill_ms"] for r in trace),
        "decode_ms_per_token": sum(r["decode_ms"] for r in trace) / tokens if tokens else 0.0,
        "peak_memory_mb": peak_memory_mb(device),
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
    """The runs of RUNS that --paths and --no-measurements leave, on one model; the report (only
    {"partial": figures} when eager or optimized was left out)."""
    model = bench_model(args)
    conversation, warmup = bench_videos(args)
    results = {}
    replies = {}
    paths = args.paths.split(",")
    for name, optimized, reference_scores, speak_probe, compile in RUNS:
        path = "optimized" if optimized else "eager"
        if path not in paths or (name not in ("eager", "optimized_uncompiled", "optimized") and not args.measurements):
            continue
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(model.device)
        results[name], replies[name] = measure(model, conversation, warmup, optimized, args, reference_scores, speak_probe, compile)
        log.info("%s: %.1f ms/frame", name, results[name]["ms_per_frame"])
    compiled = _compile_comparison(results, replies)
    if not {"eager", "optimized"} <= set(results):
        return {"partial": results, **({"compile": compiled} if compiled else {})}
    common = sorted(set(replies["eager"]) & set(replies["optimized"]))
    same = sum(replies["eager"][i] == replies["optimized"][i] for i in common)
    measured = {name: {**results[name], "ratio_to_optimized": results[name]["ms_per_frame"] / results["optimized"]["ms_per_frame"],
                       "reply_agreement_with_optimized": _agreement(replies[name], replies["optimized"])}
                for name, *_ in RUNS[3:] if name in results}
    return {
        **report_header(args, model, conversation),
        "strategy": f"drop_middle {args.max_seq_len}/{args.reserved}/{args.last_keep}",
        "eager": results["eager"], "optimized": results["optimized"],
        "ratio_eager_over_optimized": results["eager"]["ms_per_frame"] / results["optimized"]["ms_per_frame"],
        "reply_agreement": same / len(common) if common else 0.0, "replies_compared": len(common),
        "measurements": measured,
        "compile": compiled,
        "optimized_uncompiled": results["optimized_uncompiled"],
    }


def _compile_comparison(results: dict, replies: dict) -> dict | None:
    """The optimized path uncompiled against compiled (stream.compile=auto), when both ran."""
    if not {"optimized", "optimized_uncompiled"} <= set(results):
        return None
    uncompiled = results["optimized_uncompiled"]
    return {
        "compiled": results["optimized"]["compiled"],
        "decode_ms_per_token": {"uncompiled": uncompiled["decode_ms_per_token"], "compiled": results["optimized"]["decode_ms_per_token"]},
        "frame_prefill_ms": {"uncompiled": uncompiled["frame_prefill_ms"], "compiled": results["optimized"]["frame_prefill_ms"]},
        "ms_per_frame": {"uncompiled": uncompiled["ms_per_frame"], "compiled": results["optimized"]["ms_per_frame"]},
        # the compiled run's warm-up compiles (once per process) and captures; the uncompiled one only captures
        "compile_s": results["optimized"]["warmup_s"] - uncompiled["warmup_s"],
        "reply_agreement": _agreement(replies["optimized"], replies["optimized_uncompiled"]),
    }


def _agreement(replies: dict[int, str], reference: dict[int, str]) -> float:
    """The share of `reference`'s replies that `replies` has identical, at the same frame."""
    return sum(replies.get(index) == text for index, text in reference.items()) / len(reference) if reference else 1.0


def format_bench(report: dict) -> str:
    """The report as a table: eager against optimized, then one line per run with measurements (a partial
    report, without one of the two paths, as its JSON)."""
    if "partial" in report:
        return json.dumps(report, indent=1)
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
    compile = report.get("compile")
    if compile:
        state = "compiled" if compile["compiled"] else "not compiled here (stream.compile=auto is off off CUDA)"
        lines.append(f"optimized path {state}; uncompiled -> compiled: decode {compile['decode_ms_per_token']['uncompiled']:.2f} -> "
                     f"{compile['decode_ms_per_token']['compiled']:.2f} ms/token, frame prefill {compile['frame_prefill_ms']['uncompiled']:.2f} -> "
                     f"{compile['frame_prefill_ms']['compiled']:.2f} ms, {compile['ms_per_frame']['uncompiled']:.2f} -> "
                     f"{compile['ms_per_frame']['compiled']:.2f} ms/frame; compilation ~{compile['compile_s']:.1f} s once per process; "
                     f"{compile['reply_agreement']:.0%} of the replies identical")
    for name, figures in report.get("measurements", {}).items():
        lines.append(f"{name}: {figures['ms_per_frame']:.2f} ms per frame = {figures['ratio_to_optimized']:.3f}x optimized "
                     f"({figures['references_scored']} references scored, {figures['frames_probed']} frames probed; scoring "
                     f"{figures['score_ms_per_frame']:.3f} + probing {figures['probe_ms_per_frame']:.3f} ms per frame; "
                     f"{figures['reply_agreement_with_optimized']:.0%} of the replies identical to the optimized run's)")
    return "\n".join(lines)
