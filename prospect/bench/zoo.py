"""`python -m prospect.bench zoo`: what each bounded strategy's reductions cost.

Streams the bench video (prospect.bench.common) under each bounded strategy
(prospect.context_strategies.zoo_strategies, or those --strategies names) on the default path, one model
loaded once, and reports ms per frame and ms per reduction (synchronized, at the strategy's threshold of
max_seq_len - reserved tokens).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time

import torch

from prospect.bench.common import bench_model, bench_videos, report_header
from prospect.context_strategies import STRATEGIES, BaseContextStrategy, create_strategy, zoo_strategies
from prospect.stream.feed import synchronize
from prospect.stream.runner import StreamRunner
from prospect.stream.settings import StreamSettings

log = logging.getLogger(__name__)


def build_strategies(args) -> dict[str, BaseContextStrategy]:
    """The strategies `--strategies` names (default: every bounded one), built before anything loads; an
    entry may set the strategy's own keys after colons (`snapkv:selection=shared`), its row is named by the
    whole entry. ValueError names the culprit."""
    entries = zoo_strategies() if args.strategies is None else args.strategies.split(",")
    built = {}
    for entry in entries:
        name, *settings = entry.split(":")
        try:
            params = dict(setting_value(setting) for setting in settings)
            known = [field.name for field in dataclasses.fields(STRATEGIES[name])] if name in STRATEGIES else []
            for key in params:
                if known and key not in known:
                    raise ValueError(f"{key}: not a key of {name}; it has: {', '.join(known)}")
            budget = {"max_seq_len": args.max_seq_len, "reserved_seq_len": args.reserved, "last_keep_len": args.last_keep}
            built[entry] = create_strategy(name, **budget, **params)
        except ValueError as error:
            raise ValueError(f"--strategies {entry}: {error}") from None
    return built


def setting_value(setting: str) -> tuple[str, object]:
    """`key=value` of a --strategies entry; the value as a bool (true/false), an int, a float or else a string."""
    key, equals, text = setting.partition("=")
    if not equals or not key:
        raise ValueError(f"{setting}: expected key=value")
    if text.lower() in ("true", "false"):
        return key, text.lower() == "true"
    for kind in (int, float):
        try:
            return key, kind(text)
        except ValueError:
            pass
    return key, text


def zoo_row(trace: list[dict], wall: float) -> dict:
    """One strategy's figures from its run's trace and wall time (seconds)."""
    reductions = [r for record in trace for r in record.get("reductions", [])]
    reduce_ms = sum(record["reduce_ms"] for record in trace)
    return {
        "ms_per_frame": 1000 * wall / len(trace), "reductions": len(reductions),
        "ms_per_reduction": reduce_ms / len(reductions) if reductions else 0.0,
        "tokens_before_reduction": statistics.mean(r["before"] for r in reductions) if reductions else 0,
        "tokens_after_reduction": statistics.mean(r["after"] for r in reductions) if reductions else 0,
        "max_cache": max(record["cache_max"] for record in trace),
        "frame_share": statistics.mean(r["cache_frame_tokens"] / max(1, r["cache_after"]) for r in trace),
    }


def run_zoo(args) -> dict:
    """Each bounded strategy streams the bench video once (after a warm-up): ms per frame, per reduction.
    A strategy that fails is recorded with its error; the others still run."""
    strategies = build_strategies(args)
    model = bench_model(args)
    conversation, warmup = bench_videos(args)
    settings = StreamSettings(max_new_tokens=args.reply_tokens, min_new_tokens=args.reply_tokens, vision_batch_size=args.vision_batch)
    rows = {}
    for name, strategy in strategies.items():
        try:
            runner = StreamRunner(model, strategy, settings)
            runner.run(warmup)
            synchronize(model.device)
            started = time.perf_counter()
            trace = runner.run(conversation).trace
            wall = time.perf_counter() - started
        except Exception as error:  # recorded; the other strategies still run
            rows[name] = {"error": f"{type(error).__name__}: {error}"}
            log.error("%s failed: %s", name, rows[name]["error"])
            continue
        rows[name] = zoo_row(trace, wall)
        log.info("%s: %.2f ms/frame, %.2f ms per reduction", name, rows[name]["ms_per_frame"], rows[name]["ms_per_reduction"])
        del runner
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
    return {**report_header(args, model, conversation), "budget": f"{args.max_seq_len}/{args.reserved}, last_keep_len {args.last_keep}",
            "strategies": rows}


def format_zoo(report: dict) -> str:
    """The report as a table, one row per strategy."""
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
