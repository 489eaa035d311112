"""The command line of `python -m prospect.bench` (see prospect.bench): arguments, their checks, the mode's run."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

import prospect.bench
from prospect.signals import EXIT_USAGE, exit_code
from prospect.bench.grid import GRID_PARTS, format_grid, grid_parts, run_grid


def build_parser() -> argparse.ArgumentParser:
    """The arguments of every mode (each mode reads those it needs)."""
    parser = argparse.ArgumentParser(prog="python -m prospect.bench", description=prospect.bench.__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=("stream", "grid", "zoo", "dataset"), default="stream")
    # default None: every bounded strategy (prospect.context_strategies.zoo_strategies, which loads torch: not before parsing)
    parser.add_argument("--strategies", default=None, help="zoo: the strategies to time, comma-separated; NAME:KEY=VALUE sets a strategy key (snapkv:selection=shared)")
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
    parser.add_argument("--summary-tokens", type=int, default=None,
                        help="grid: cap summarize_and_drop's summaries at N tokens (default: its 512; random weights never stop early)")
    parser.add_argument("--zoo-lanes-per-gpu", type=int, default=40, help="grid: lanes_per_gpu for the zoo_fused part")
    parser.add_argument("--part", default=None,
                        help=f"grid: the parts to run, comma-separated, of {', '.join(GRID_PARTS)}, or all (default: the first "
                             "two, and fused with --fused); for machines that limit one command's time")
    parser.add_argument("--conversations", type=int, default=16, help="dataset: how many conversations of mixed length")
    parser.add_argument("--conversation-batch", type=int, default=16, help="dataset: conversations at once in the batched run")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: bench.json, grid.json, zoo.json or dataset.json)")
    return parser


def count_error(args) -> str | None:
    """What is wrong with the counts and lengths (the error line's text), or None."""
    counts = {"--eager-jobs": args.eager_jobs, "--jobs-per-gpu": args.jobs_per_gpu, "--lanes-per-gpu": args.lanes_per_gpu,
              "--zoo-lanes-per-gpu": args.zoo_lanes_per_gpu, "--summary-tokens": 1 if args.summary_tokens is None else args.summary_tokens,
              "--conversations": args.conversations, "--conversation-batch": args.conversation_batch}
    bad = next((f"{name} {value}" for name, value in counts.items() if value < 1), None)
    if bad:
        return f"{bad}: must be at least 1"
    if args.turns < 1 or args.reply_tokens < 1 or args.seconds <= 0:
        return "--turns, --reply-tokens and --seconds must be positive"
    return None


def mode_functions(mode: str) -> tuple:
    """(check: raises ValueError for bad arguments, or None; run: the report; format: its text) of a mode."""
    if mode == "grid":
        return grid_parts, run_grid, format_grid
    if mode == "dataset":
        from prospect.bench import dataset  # lazy, as below: torch and the model code load after the arguments are parsed

        return None, dataset.run_dataset, dataset.format_dataset
    if mode == "zoo":
        from prospect.bench import zoo  # lazy, as stream below: torch and the model code load after the arguments are parsed

        return zoo.build_strategies, zoo.run_zoo, zoo.format_zoo
    from prospect.bench import stream  # lazy: torch and the model code load after the arguments are parsed

    return None, stream.run_bench, stream.format_bench


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    error = count_error(args)
    if error:
        print(f"prospect.bench: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    check, run, format_report = mode_functions(args.mode)
    if check is not None:
        try:
            check(args)
        except ValueError as bad:
            print(f"prospect.bench: error: {bad}", file=sys.stderr)
            return EXIT_USAGE
    args.out = args.out or Path({"grid": "grid.json", "zoo": "zoo.json", "dataset": "dataset.json"}.get(args.mode, "bench.json"))
    report = run(args)
    text = format_report(report)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(text)
    print(f"wrote {args.out}")
    stopped = report.get("stopped_by")
    return exit_code(signal.Signals[stopped]) if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
