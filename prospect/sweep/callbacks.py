"""The Hydra callback that writes the sweep summary when a multirun ends (registered in conf/config.yaml).

The paired differences of the summary are taken against `summary.baseline` of the sweep's config. A
baseline naming no job of the sweep costs nothing computed: the summary is written with the default
baseline (summary.baseline=null) and the problem logged as one error line naming the sweep's jobs.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from prospect.signals import DiskFull, is_disk_full
from prospect.sweep.baselines import FROM_SWEEP_CONFIG, BaselineError, FromSweepConfig, baseline_text
from prospect.sweep.summary import write_summary

log = logging.getLogger(__name__)

_failed_jobs: list[int] = []


def failed_jobs() -> int:
    """Failed or missing jobs counted by the last sweep summary of this process."""
    return _failed_jobs[-1] if _failed_jobs else 0


def configured_baseline(config: DictConfig) -> Any:
    """summary.baseline of a sweep's config (None when the config has no `summary` node)."""
    return OmegaConf.select(config, "summary.baseline", default=None)


def _write(sweep_dir: str, baseline: str | int | None | FromSweepConfig) -> dict:
    """write_summary; a baseline naming no job of the sweep is logged in one line and the default one used."""
    try:
        return write_summary(sweep_dir, baseline=baseline)
    except BaselineError as error:
        log.error("sweep summary: summary.baseline=%s: %s; the summary uses the default baseline (summary.baseline=null)",
                  baseline_text(baseline), error)
        return write_summary(sweep_dir, baseline=None)


def summarize_sweep(sweep_dir: str, interrupted: str | None = None,
                    baseline: str | int | None | FromSweepConfig = FROM_SWEEP_CONFIG) -> dict | None:
    """Write and print the summary of a sweep folder (summary.csv, summary.md, pareto.png,
    cache_timelines.png, ref_nll_by_turn.png) and count its failed jobs. `interrupted`: why the sweep stopped
    early (a signal, a full disk; prospect.run calls this itself then, as Hydra's end-of-multirun callback does not
    run): the summary then never raises, a failure to write it is logged. `baseline`: summary.baseline (by default
    read from the sweep's multirun.yaml). A summary the disk has no room for raises DiskFull (its files are
    written atomically: none is left half written)."""
    try:
        summary = _write(sweep_dir, baseline)
    except (Exception, DiskFull) as error:
        if interrupted is None and (isinstance(error, DiskFull) or is_disk_full(error)):
            full = error if isinstance(error, DiskFull) else DiskFull.of(error)
            log.error("could not write the summary of the sweep %s: %s", sweep_dir, full)
            full.sweep_dir, full.summary_tried = str(sweep_dir), True
            raise full from None  # prospect.run's cli() prints the one line and exits EXIT_DISK_FULL
        if interrupted is None:
            raise
        reason = str(error) if isinstance(error, DiskFull) else f"{type(error).__name__}: {error}"
        log.error("could not write the summary of the stopped sweep %s: %s", sweep_dir, reason)
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
    """on_multirun_end: summary.csv, summary.md, pareto.png, cache_timelines.png and ref_nll_by_turn.png in the
    sweep dir, the differences against config.summary.baseline; the table is printed, and each note (e.g. no F1
    without evaluation) logged as a warning."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarize_sweep(config.hydra.sweep.dir, baseline=configured_baseline(config))
