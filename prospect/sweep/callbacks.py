"""The Hydra callback that writes the sweep summary when a multirun ends (registered in conf/config.yaml)."""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from prospect.sweep.summary import write_summary

log = logging.getLogger(__name__)

_failed_jobs: list[int] = []


def failed_jobs() -> int:
    """Failed or missing jobs counted by the last sweep summary of this process."""
    return _failed_jobs[-1] if _failed_jobs else 0


def summarize_sweep(sweep_dir: str, interrupted: str | None = None) -> dict | None:
    """Write and print the summary of a sweep folder (summary.csv, summary.md, pareto.png,
    cache_timelines.png) and count its failed jobs. `interrupted`: why the sweep stopped early (a signal;
    prospect.run calls this itself then, as Hydra's end-of-multirun callback does not run)."""
    try:
        summary = write_summary(sweep_dir)
    except Exception as error:
        if interrupted is None:
            raise
        log.error("could not write the summary of the interrupted sweep %s: %s: %s", sweep_dir, type(error).__name__, error)
        return None
    _failed_jobs.append(sum(len(row["jobs"].split()) for row in summary["failures"]))
    log.info("sweep summary: %d jobs, %d distinct, written to %s", summary["jobs"], len(summary["rows"]),
             ", ".join(p.name for p in summary["files"]))
    print((summary["files"][1]).read_text())
    for note in summary["notes"]:  # e.g. F1 absent (eval=none): pareto.png plots KV memory against time
        log.warning("sweep summary: %s", note)
    if interrupted:
        log.warning("sweep summary: the sweep was stopped (%s); the jobs after it were not started", interrupted)
    if summary["failures"]:
        log.error("%d job(s) failed or are missing; see summary.md", failed_jobs())
    return summary


class SweepSummary(Callback):
    """on_multirun_end: summary.csv, summary.md, pareto.png and cache_timelines.png in the sweep dir; the
    table is printed, and each note (e.g. no F1 without evaluation) logged as a warning."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarize_sweep(config.hydra.sweep.dir)
