"""Weights & Biases mirror of a run's local result files (docs/evaluation.md, "Weights & Biases").

The local files (results.json, predictions.json, trace.jsonl) are the record; W&B only mirrors them:
config, per-frame history, summary metrics and a predictions table. The mirror never fails a run:
a missing key, no network or any W&B error is warned about once and the mirror switches itself off.

Usage (the caller owns the `finally`; an unfinished run swallows the next job's data)::

    mirror = WandbMirror()
    mirror.start(cfg.logger, run_dir, config, name)
    try:
        ...  # write the local files, then mirror.log_trace(records)
    finally:
        mirror.finish(summary, predictions, exit_code)
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import OmegaConf

from prospect.stream.frame_record import FrameRecord
from prospect.context_strategies.events import REDUCTION_EVENTS
from prospect.tracking import reductions

log = logging.getLogger(__name__)

DEFAULT_HOST = "https://api.wandb.ai"
PREDICTION_COLUMNS = ["conversation", "index", "time", "gen", "ref"]


def api_key_configured() -> bool:
    """True when WANDB_API_KEY is set or the netrc file ($NETRC or ~/.netrc) has an entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def history_row(record: FrameRecord) -> dict[str, Any]:
    """One trace record (stream/runner.py) as a W&B history row. Times in s, latencies in ms, sizes in tokens."""
    events = record.get("events", [])
    row: dict[str, Any] = {
        "time": record["time"],
        "frame_index": record["index"],
        "cache_length": record["cache_after"],
        "cache_before": record["cache_before"],
        "cache_max": record.get("cache_max"),
        "cache_frame_tokens": record.get("cache_frame_tokens"),
        "cache_dialogue_tokens": record.get("cache_dialogue_tokens"),
        "next_position": record.get("next_position"),
        "chunk_tokens": record.get("chunk_tokens"),
        "generated_tokens": record.get("generated_tokens", 0),
        "frame_ms": record.get("wall_ms"),
        "speak": int("speak" in events),
        "tokens_dropped": sum(before - after for _, before, after in reductions(record)),
    }
    for key in ("vision_ms", "prefill_ms", "decode_ms", "reduce_ms", "speak_probability", "ref_nll", "ref_tokens", "ref_top1"):
        row[key] = record.get(key)
    for event in REDUCTION_EVENTS:
        row[event] = events.count(event)
    return {key: value for key, value in row.items() if value is not None}


def prediction_rows(predictions: Mapping[str, Any]) -> list[list[Any]]:
    """predictions.json as table rows in PREDICTION_COLUMNS order."""
    return [
        [conversation["id"], frame["index"], frame["time"], frame["gen"], frame["ref"]]
        for conversation in predictions.get("conversations", [])
        for frame in conversation.get("frames", [])
    ]


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists, other values unchanged."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


class WandbMirror:
    """Mirrors one run to W&B; every method is a no-op once the mirror is off (not started, logger not
    `wandb`, or after the first W&B error). `finish` is idempotent and must be called from a `finally`."""

    def __init__(self) -> None:
        self.run: Any = None  # the wandb Run while mirroring
        self.step = 0  # next history step: the global frame index across the run's conversations
        self._warned = False

    @property
    def active(self) -> bool:
        return self.run is not None

    def start(
        self, logger_cfg: Mapping[str, Any] | None, run_dir: str | Path, config: Mapping[str, Any], name: str | None = None,
        concurrent: bool = False,
    ) -> None:
        """Open the W&B run, with its files under `run_dir`/wandb. `concurrent`: other runs of this process stay
        open beside it (the lanes of a fused sweep, one run per job).

        Mode: logger `mode` if set, else WANDB_MODE, else offline when no API key is configured.
        Name: logger `job_name` if set, else `name`. Group and tags come from the logger config.
        """
        logger_cfg = _plain(logger_cfg) or {}
        if logger_cfg.get("name") != "wandb":
            return
        try:
            import wandb  # lazy: wandb costs ~0.5 s, only with logger=wandb

            mode = logger_cfg.get("mode")
            forced_offline = mode is None and not os.environ.get("WANDB_MODE") and not api_key_configured()
            self.run = wandb.init(
                dir=str(run_dir),
                mode="offline" if forced_offline else mode,
                project=logger_cfg.get("project"),
                entity=logger_cfg.get("entity"),
                group=logger_cfg.get("group"),
                tags=list(logger_cfg.get("tags") or []),
                name=logger_cfg.get("job_name") or name,
                config=_plain(config),
                # a job never writes into a run a previous job left open; lanes each open their own
                reinit="create_new" if concurrent else "finish_previous",
            )
            if forced_offline:
                sync_dir = self.run.settings.sync_dir
                log.warning("no W&B API key: logging offline to %s; upload later with `wandb sync %s`", sync_dir, sync_dir)
        except Exception as error:  # W&B must never fail the run
            self._disable("wandb.init", error)

    def log_trace(self, records: Iterable[FrameRecord]) -> None:
        """Log trace records as history rows; steps continue across calls (one call per conversation is fine)."""
        if self.run is None:
            return
        try:
            for record in records:
                self.run.log(history_row(record), step=self.step)
                self.step += 1
        except Exception as error:
            self._disable("logging the trace", error)

    def finish(self, summary: Mapping[str, Any] | None = None, predictions: Mapping[str, Any] | None = None, exit_code: int = 0) -> None:
        """Write the flat metrics to the run summary, the predictions as a table, and finish the run
        with `exit_code`. Safe to call more than once (later calls do nothing)."""
        run, self.run = self.run, None
        if run is None:
            return
        try:
            if summary:
                run.summary.update(dict(_plain(summary)))
            if predictions:
                import wandb  # lazy: wandb costs ~0.5 s, only with logger=wandb

                run.log({"predictions": wandb.Table(columns=PREDICTION_COLUMNS, data=prediction_rows(predictions))})
        except Exception as error:
            self._warn("the W&B summary/predictions", error)
        try:
            run.finish(exit_code=exit_code)
        except Exception as error:
            self._warn("wandb finish", error)
            _teardown_broken_service()

    # ---- failure handling -------------------------------------------------------------------------

    def _warn(self, what: str, error: BaseException) -> None:
        if not self._warned:
            self._warned = True
            message = " ".join(str(error).split())[:300]
            log.warning(
                "W&B mirror off for the rest of this run (%s failed: %s: %s); local files are unaffected", what, type(error).__name__, message
            )

    def _disable(self, what: str, error: BaseException) -> None:
        """Warn once and stop mirroring; a run already open is finished so it cannot swallow later data."""
        self._warn(what, error)
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:
                _teardown_broken_service()


def _teardown_broken_service() -> None:
    """After a run could not be finished (the W&B service process died, say), tear W&B's session down so
    that its exit hook does not print a traceback when the process ends; the next run starts a new service."""
    try:
        import wandb  # lazy: wandb costs ~0.5 s, only with logger=wandb

        wandb.teardown()
    except (Exception, SystemExit):  # teardown reports a broken service by raising or sys.exit
        pass
