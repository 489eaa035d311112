"""`python -m prospect.report SWEEP_DIR`: (re)write a sweep's summary.csv, summary.md, pareto.png and
cache_timelines.png from its job folders, and print the table (shared overrides once, rows labelled by
the overrides that vary) and any note (e.g. F1 absent without evaluation)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prospect.sweep.summary import write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prospect.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (holds one folder per job)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"prospect.report: error: {args.sweep_dir}: no such directory", file=sys.stderr)
        return 2
    summary = write_summary(args.sweep_dir)
    if not summary["jobs"]:
        print(f"prospect.report: error: {args.sweep_dir}: no job folders (with .hydra/ or results.json) inside", file=sys.stderr)
        return 2
    print((args.sweep_dir / "summary.md").read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in summary['files'])}")
    for note in summary["notes"]:  # e.g. F1 absent (eval=none): pareto.png plots KV memory against time
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
