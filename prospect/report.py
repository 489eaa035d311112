"""`python -m prospect.report SWEEP_DIR [--baseline X]`: (re)write a sweep's summary.csv, summary.md,
pareto.png, cache_timelines.png and ref_nll_by_turn.png from its job folders, and print the table (shared
overrides once, rows labelled by the overrides that vary, each metric with its 95% interval over
conversations), the paired differences against the baseline, and any note (e.g. F1 absent without
evaluation).

--baseline: what the paired differences are taken against: `null` (per row, the drop_middle row whose
other varying overrides match; without one, the first row), a strategy name (the same rule with that
strategy) or a job number (that job for every row). Without it, summary.baseline of the sweep's
multirun.yaml (null when absent). A baseline naming no job of the sweep: one error line listing the
jobs, exit 2, nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prospect.signals import EXIT_USAGE
from prospect.sweep.baselines import FROM_SWEEP_CONFIG, BaselineError
from prospect.sweep.summary import write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prospect.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (holds one folder per job)")
    parser.add_argument("--baseline", default=None, metavar="X",
                        help="null, a strategy name or a job number (default: summary.baseline of the sweep's multirun.yaml)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"prospect.report: error: {args.sweep_dir}: no such directory", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = write_summary(args.sweep_dir, baseline=FROM_SWEEP_CONFIG if args.baseline is None else args.baseline)
    except BaselineError as error:
        print(f"prospect.report: error: --baseline={args.baseline}: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not summary["jobs"]:
        print(f"prospect.report: error: {args.sweep_dir}: no job folders (with .hydra/ or results.json) inside", file=sys.stderr)
        return EXIT_USAGE
    print((args.sweep_dir / "summary.md").read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in summary['files'])}")
    for note in summary["notes"]:  # e.g. F1 absent (eval=none): pareto.png plots KV memory against time
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
