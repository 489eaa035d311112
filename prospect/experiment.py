"""The run path, one plain function for 1..L jobs (tests call it): config -> dataset -> model -> stream
(strategy inside) -> predictions.json + trace.jsonl -> evaluation -> results.json, plots, timeline -> W&B.

`run(cfg, output_dir)` is one job; `run_jobs(cfgs, output_dirs, lanes=True)` runs jobs that differ only in
their strategy as lanes of one model (prospect.stream.lanes; the fused launcher calls it). A single job is
the one-lane case: the same skeleton validates each job, loads the dataset and the model once, streams,
scores and writes each job's files.

Local files are the source of truth and are written first; results.json is written even when the run
fails, without losing the predictions already made. Stop signals (prospect/signals.py; docs/sweeps.md,
"Interruptions and preemption") stop every lane after the frame in progress; what was computed is
written, then `Interrupted` is raised. A file that cannot be written for lack of room (a full disk, a
file-size limit, a read-only file system, a quota) stops the run the same way with `DiskFull`: every file
already written stays valid, results.json is written where it still can be, then `DiskFull` is raised.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from prospect.context_strategies import strategy_from_config
from prospect.data import load_dataset
from prospect.data.types import Conversation
from prospect.eval import evaluate_predictions, measured_scores
from prospect.eval.intervals import interval_summary, intervals
from prospect.models.vlm import load_model
from prospect.signals import DiskFull, Interrupted, StopSignals, is_disk_full
from prospect.stream.frame_record import ConversationResult
from prospect.stream.lanes import LaneRunner, OneLane, conversation_batch
from prospect.stream.oracle import OracleRunner
from prospect.stream.feed import peak_memory_mb
from prospect.stream.runner import StreamRunner
from prospect.stream.settings import stream_settings
from prospect.tracking.console import console_summary
from prospect.tracking.job_files import JobFiles, predictions_document, write_json
from prospect.tracking.results import batches_conversations, environment, job_key, results_document, stream_metrics
from prospect.validation import validate

log = logging.getLogger(__name__)

SHARED_EXCLUDED = ("strategy", "logger")  # what may differ between the jobs of one run_jobs call


@dataclass
class RunReport:
    """Everything a finished (or failed) run produced, before it is written."""

    results: list[ConversationResult] = field(default_factory=list)
    evaluation: dict | None = None
    status: str = "ok"
    error: str | None = None
    started_at: float = field(default_factory=time.time)  # unix seconds
    kv_bytes_per_token: int = 0  # of the model that ran (0 for the oracle)
    exit_code: int | None = None  # of an interrupted run (128 + signal), for W&B


@contextlib.contextmanager
def recording_failure(report: RunReport) -> Iterator[None]:
    """Record an exception as the run's failure (status, error, traceback in the log) instead of raising;
    an interrupt (Ctrl-C, a scheduler's signal) and a full disk (DiskFull; an OSError of a full disk becomes
    one) are recorded too, then raised again."""
    try:
        try:
            yield
        except Exception as error:
            if is_disk_full(error):  # wherever it came from, the run has no room for its files: stop
                raise DiskFull.of(error) from None
            raise
    except Exception as error:
        report.status, report.error = "failed", f"{type(error).__name__}: {error}"
        log.exception("run failed: %s", report.error)
    except DiskFull as error:  # a file of the run has no room: the message names it
        report.status, report.error, report.exit_code = "failed", str(error), error.exit_code
        log.error("run stopped: %s; writing what was computed", error)
        raise
    except Interrupted as error:  # a stop signal, at a safe point: the message names it and where
        report.status, report.error, report.exit_code = "failed", str(error), error.exit_code
        log.error("run %s; writing what was computed", error)
        raise
    except BaseException as error:
        report.status, report.error = "failed", f"interrupted ({type(error).__name__})"
        report.exit_code = 130 if isinstance(error, KeyboardInterrupt) else 1
        raise


def score(report: RunReport, eval_cfg: DictConfig) -> None:
    """Evaluate the predictions made so far (ProAssist protocol) unless eval=none."""
    if eval_cfg.name != "none":
        report.evaluation = evaluate_predictions(predictions_document(report.results), eval_cfg)


def scored(report: RunReport, predictions: dict) -> dict:
    """The evaluation, or without one (eval=none, or a run stopped before it) the stream's own measurements
    of the predictions (reference scores, P(speak)): {"metrics", "per_conversation", ...}."""
    if report.evaluation:
        return report.evaluation
    return measured_scores(predictions)


def per_conversation_metrics(report: RunReport, scores: dict | None = None) -> dict[str, dict]:
    rows = {}
    for result in report.results:
        flat = stream_metrics([result.trace], result.peak_memory_mb, report.kv_bytes_per_token)
        if scores:
            flat.update(scores.get("per_conversation", {}).get(result.conversation.id, {}))
        if result.error:
            flat["error"] = result.error
        rows[result.conversation.id] = flat
    return rows


def summarize(report: RunReport, scores: dict | None = None) -> dict[str, Any]:
    """Flat metrics: stream figures plus the evaluation's (seed names where it had them) or, without one, the
    stream's measured scores."""
    metrics = stream_metrics(
        [r.trace for r in report.results], max((r.peak_memory_mb for r in report.results), default=0.0), report.kv_bytes_per_token
    )
    if scores:
        metrics.update(scores["metrics"])
    if report.evaluation:
        metrics["dialogues_matched"] = report.evaluation["metrics"].get("num_matched", 0)
    return metrics


def finish_run(
    report: RunReport, output_dir: Path, config: dict, env: dict, key: str, strategy_name: str, max_seq_len: int | None = None,
    mirror: Any = None, extra: dict | None = None,
) -> dict:
    """Write results.json, the plot and the timeline, print the summary, close the W&B mirror (always).
    A file the disk has no room for raises DiskFull at the end (results.json, if it was written, stands)."""
    failed = [r for r in report.results if r.error]
    if failed and report.status == "ok":
        report.status = "failed"
        report.error = f"{len(failed)} of {len(report.results)} conversations failed; first {failed[0].conversation.id}: {failed[0].error}"
    unscored = [s for s in (report.evaluation or {}).get("skipped", []) if not any(r.conversation.id == s["id"] for r in failed)]
    if unscored and report.status == "ok":  # metrics without some conversations are not the run's metrics
        report.status = "failed"
        report.error = f"evaluation skipped {len(unscored)} conversation(s); first {unscored[0]['id']}: {unscored[0]['error']}"
    metrics: dict = {}
    predictions = predictions_document(report.results)
    document: dict = {}
    full: DiskFull | None = None
    try:
        scores = scored(report, predictions)
        metrics = summarize(report, scores)
        per_conversation = per_conversation_metrics(report, scores)
        extra = {**(extra or {}), "started_at": report.started_at, "finished_at": time.time(),
                 "intervals": intervals(per_conversation)}
        if report.evaluation:
            extra.update({k: report.evaluation[k] for k in ("per_subset", "skipped") if k in report.evaluation})
        if scores.get("notes"):
            extra["notes"] = scores["notes"]
        document = results_document(report.status, report.error, metrics, per_conversation, config, env, key, extra)
        write_json(output_dir / "results.json", document)
        records = [rec for r in report.results for rec in r.trace]
        try:
            from prospect.tracking.plots import plot_cache_sizes  # lazy: matplotlib costs ~1 s, only when the figure is drawn
            from prospect.tracking.timeline import write_timeline

            plot_cache_sizes(output_dir / "cache_sizes.png", records, title=f"{strategy_name}: cache length", max_seq_len=max_seq_len)
            write_timeline(output_dir / "timeline.html", predictions, records, title=f"{strategy_name} ({key})", max_seq_len=max_seq_len)
        except DiskFull as error:  # figures are a courtesy, but a full disk stops the run (once its summary is out)
            full = error
            log.warning("could not write the plot/timeline: %s", error)
        except Exception as error:  # figures are a courtesy: they never cost the results
            log.warning("could not draw the plot/timeline: %s: %s", type(error).__name__, error)
        log.info("\n%s", console_summary(strategy_name, report.status, report.error, metrics, report.results, output_dir))
    except DiskFull as error:  # no room for results.json: the files written so far stand, the job's are incomplete
        full = error
        log.error("results.json not written: %s", error)
    except Exception as error:  # still leave a results.json that says what happened
        log.exception("could not write the results")
        report.status, report.error = "failed", f"writing results failed: {type(error).__name__}: {error}"
        document = results_document(report.status, report.error, metrics, {}, config, env, key)
        write_json(output_dir / "results.json", document)
    finally:
        if mirror is not None:
            exit_code = report.exit_code if report.exit_code is not None else full.exit_code if full is not None else \
                0 if report.status == "ok" else 1
            mirror.finish(summary={**metrics, **interval_summary(document.get("intervals", {}))}, predictions=predictions,
                          exit_code=exit_code)
    if full is not None:
        raise full
    return document


def run_name(cfg: DictConfig) -> str:
    if cfg.logger.get("job_name"):
        return str(cfg.logger.job_name)
    try:
        overrides = HydraConfig.get().job.override_dirname
    except ValueError:  # not inside a Hydra app
        overrides = ""
    return f"{cfg.strategy.name}{'-' + overrides if overrides else ''}"


def run(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Run the job of `cfg` into `output_dir` (its own step: eager or optimized, as `stream.optimized` says);
    returns its results.json document. See run_jobs."""
    return run_jobs([cfg], [output_dir])[0]


def run_jobs(cfgs: Sequence[DictConfig], output_dirs: Sequence[str | Path], lanes: bool = False,
             batch_lanes: bool | None = None, search_path: Sequence[str] | None = None) -> list[dict]:
    """Run jobs that differ only in their strategy (and logger) with one dataset and one model; each job
    writes exactly its own files (results.json with its job key, predictions, trace, plots, its own W&B run)
    into its own folder. Returns the results.json documents, in order.

    One job without `lanes` runs alone (prospect.stream.lanes.OneLane), on the step `stream.optimized` picks.
    With `lanes`, the jobs are lanes of one LaneRunner on the optimized step: `stream.optimized: auto` is
    settled to true before the job keys are computed, a lane that raises is recorded failed and the others go
    on, and results.json names the lane set. `batch_lanes`: see LaneRunner.

    Each job's config is validated here (prospect.validation), before anything loads: a job whose config
    is bad, or whose strategy cannot be built, is recorded failed alone. `search_path`: the sweep's
    hydra.searchpath entries (a fused worker runs outside Hydra; default: the running Hydra app's).

    SIGINT/SIGTERM/SIGUSR2 stop every job at the next frame (prospect/signals.py): the files are written, then
    `Interrupted` is raised. A signal that comes once the last frame is streamed lets the jobs finish (status
    ok) and `Interrupted` is raised after their files are written. A file that has no room (DiskFull) stops
    every job the same way: each job's results.json is still tried, then the first DiskFull is raised (it
    also takes the place of a signal's stop whose results could not be written)."""
    if len(cfgs) != len(output_dirs) or not cfgs:
        raise ValueError(f"run_jobs: {len(cfgs)} configs for {len(output_dirs)} output folders")
    if not lanes and len(cfgs) > 1:
        raise ValueError(f"run_jobs: {len(cfgs)} jobs without lanes; pass lanes=True to run them as lanes of one model")
    if lanes and any(cfg.model.get("oracle") for cfg in cfgs):  # no model, nothing to share
        return [run(cfg, output_dir) for cfg, output_dir in zip(cfgs, output_dirs)]
    if lanes or any(batches_conversations(cfg) for cfg in cfgs):
        for cfg in cfgs:  # lanes run on the optimized step: "auto" settles to it before the job keys are computed
            if cfg.stream.optimized == "auto":
                with open_dict(cfg):
                    cfg.stream.optimized = True
    dirs = [Path(d) for d in output_dirs]
    for folder in dirs:
        folder.mkdir(parents=True, exist_ok=True)
    configs = [OmegaConf.to_container(cfg, resolve=True) for cfg in cfgs]
    keys = [job_key(config) for config in configs]
    reports = [RunReport() for _ in cfgs]
    shared = RunReport()  # a failure of what the jobs share is every job's failure
    device = None
    lanes_info: dict[str, Any] = {"jobs": len(cfgs), "job_keys": keys}
    with StopSignals.current() as stop:
        mirrors = [start_mirror(cfg, folder, config, concurrent=lanes) for cfg, folder, config in zip(cfgs, dirs, configs)]
        stopped: BaseException | None = None
        try:
            with recording_failure(shared):
                check_shared(configs)
                strategies, live = validated_jobs(cfgs, reports, lanes, search_path)
                loaded = load_dataset(cfgs[0].dataset)
                stop.check("while loading the dataset, before the stream started")
                if not loaded.conversations:
                    raise RuntimeError(f"dataset {cfgs[0].dataset.name}: no conversation to run ({len(loaded.skipped)} skipped)")
                runner, device, batch = build_runner(cfgs, strategies, reports, lanes, batch_lanes, len(loaded.conversations))
                stop.check("while loading the model, before the stream started")
                lanes_info.update(conversation_batch=batch)
                if lanes:
                    lanes_info.update(lanes=len(live), batched=runner.static.batch_lanes)
                log.info("%d conversations, job key%s %s", len(loaded.conversations), "s" if len(live) > 1 else "",
                         ", ".join(keys[i] for i in live))
                files = [JobFiles(dirs[i], reports[i].results, mirror_trace(mirrors[i])) for i in live]
                try:
                    stream_jobs(runner, loaded.conversations, files, [reports[i].results for i in live], stop, batch)
                finally:
                    for job_files in files:
                        job_files.close()
                for index in live:
                    with recording_failure(reports[index]):
                        score(reports[index], cfgs[index].eval)
        except BaseException as error:  # stopped (a signal, a full disk): what was computed is still written, below
            stopped = error
        full: DiskFull | None = None
        documents: list[dict] = []
        stop.writing = True
        try:
            for index, cfg in enumerate(cfgs):
                report = reports[index]
                if shared.status != "ok" and report.status == "ok":
                    report.status, report.error, report.exit_code = shared.status, shared.error, shared.exit_code
                extra = {"lanes": {**lanes_info, "job": index}} if lanes else \
                    {"conversation_batch": lanes_info["conversation_batch"]} if "conversation_batch" in lanes_info else None
                try:
                    documents.append(finish_run(report, dirs[index], configs[index], environment(device), keys[index],
                                                str(cfg.strategy.name), int(cfg.strategy.max_seq_len), mirrors[index], extra))
                except DiskFull as error:  # this job's files are incomplete; the other jobs still write theirs
                    full = full or error
                    documents.append({"status": "failed", "error": str(error)})
        finally:
            stop.writing = False
        if stopped is not None and (full is None or isinstance(stopped, DiskFull)):
            raise stopped  # the first file that had no room is the one named
        if full is not None:
            raise full
        stop.check("after the run finished (its results are complete)")
    return documents


def check_shared(configs: Sequence[dict]) -> None:
    """The jobs of one call share everything but their strategy and logger."""
    shared_parts = [{k: v for k, v in config.items() if k not in SHARED_EXCLUDED} for config in configs]
    if any(part != shared_parts[0] for part in shared_parts):
        raise ValueError("run_jobs: the jobs differ in more than their strategy (and logger)")


def start_mirror(cfg: DictConfig, output_dir: Path, config: dict, concurrent: bool) -> Any:
    """The job's W&B mirror, started (logger=wandb), or None."""
    if cfg.logger.name != "wandb":
        return None
    from prospect.tracking.wandb_mirror import WandbMirror  # lazy: wandb takes seconds to import

    mirror = WandbMirror()
    mirror.start(cfg.logger, output_dir, config, name=run_name(cfg), concurrent=concurrent)
    return mirror


def mirror_trace(mirror: Any):
    """The per-frame callback that logs a trace record to the job's W&B run, or None."""
    return (lambda record: mirror.log_trace([record])) if mirror is not None else None


def validated_jobs(cfgs: Sequence[DictConfig], reports: Sequence[RunReport], lanes: bool,
                   search_path: Sequence[str] | None = None) -> tuple[list, list[int]]:
    """(strategies, indices of the jobs that start): each job's config validated (prospect.validation: the one
    place a job's config is checked before it runs) and its strategy built (None for the oracle), before
    anything loads. A job that fails either is recorded failed alone; if none is left, this raises."""
    live, strategies = [], []
    oracle = bool(cfgs[0].model.get("oracle"))
    for index, cfg in enumerate(cfgs):
        with recording_failure(reports[index]):
            validate(cfg, search_path)
            strategies.append(None if oracle else strategy_from_config(cfg.strategy))
            live.append(index)
    if not live:
        raise RuntimeError("no job could start (see each job's error)" if lanes else reports[0].error)
    return strategies, live


def build_runner(cfgs: Sequence[DictConfig], strategies: list, reports: Sequence[RunReport], lanes: bool,
                 batch_lanes: bool | None, conversations: int = 1) -> tuple[Any, str, int]:
    """(runner, device, conversation batch): the oracle, or one model under a LaneRunner (lanes, or a job
    streaming several conversations at once: one lane per job and conversation of a batch, a batch's jobs side
    by side) or the job alone (OneLane)."""
    if cfgs[0].model.get("oracle"):
        return OneLane(OracleRunner()), "cpu", 1
    started = time.perf_counter()
    model = load_model(cfgs[0].model, cfgs[0].paths.cache_dir, seed=int(cfgs[0].seed))
    log.info("model loaded in %.1f s", time.perf_counter() - started)
    for report in reports:
        report.kv_bytes_per_token = model.kv_bytes_per_token
    log.info("model %s (%s, %s), strateg%s %s", model.name, model.device, str(model.dtype).removeprefix("torch."),
             "ies" if len(strategies) > 1 else "y", ", ".join(s.name for s in strategies))
    settings = stream_settings(cfgs[0])
    optimized = model.device.type == "cuda" if settings.optimized == "auto" else bool(settings.optimized)
    batch = conversation_batch(settings.conversation_batch, model, strategies, conversations, lanes or optimized)
    if batch > 1:
        log.info("streaming %d conversations at once (stream.conversation_batch=%s)", batch, settings.conversation_batch)
    if lanes or batch > 1:  # each further conversation of a batch gets its own copy of every job's strategy
        every = [copy.deepcopy(strategy) if slot else strategy for slot in range(batch) for strategy in strategies]
        runner = LaneRunner(model, every, settings, batch_lanes=batch_lanes)
    else:
        runner = OneLane(StreamRunner(model, strategies[0], settings))
    return runner, str(model.device), batch


def stream_jobs(runner: Any, conversations: Iterable[Conversation], files: Sequence[JobFiles],
                results: Sequence[list[ConversationResult]], stop: StopSignals | None = None, batch: int = 1) -> None:
    """Stream the conversations through the runner's lanes (LaneRunner or OneLane), one job's files per lane,
    `batch` conversations at once (lanes: conversation-major, each conversation's jobs side by side; with
    batch > 1 the conversations are batched longest first, so a batch's lanes end at about the same step).
    Each lane's result joins its job's results (kept in dataset order) as its batch starts (an interrupted run
    keeps them). After each
    frame `stop.check()` may end the run with `Interrupted`: each conversation in progress is kept, marked
    partial. A conversation that fails in what the lanes share (or in a job alone) is recorded in every lane
    of its batch and the next batch still runs."""
    check = stop.check if stop is not None else (lambda where: None)
    device = getattr(getattr(runner, "model", None), "device", None)
    conversations = list(conversations)
    position = {id(conversation): index for index, conversation in enumerate(conversations)}
    if batch > 1:  # a batch lasts as long as its longest conversation: batch conversations of similar length
        conversations = sorted(conversations, key=lambda conversation: -conversation.num_frames)
    for start in range(0, len(conversations), batch):
        group = conversations[start : start + batch]
        lane_files = [job_files for _ in group for job_files in files]
        lane_results = [ConversationResult(conversation) for conversation in group for _ in files]
        for slot in range(len(group)):
            for job_results, result in zip(results, lane_results[slot * len(files) : (slot + 1) * len(files)]):
                job_results.append(result)
        for job_results in results if batch > 1 else ():  # predictions.json: the conversations started so far, in dataset order
            job_results.sort(key=lambda result: position.get(id(result.conversation), len(position)))
        where = f"conversation {group[0].id}" if len(group) == 1 else f"conversations {', '.join(c.id for c in group)}"
        try:
            try:
                streamed = [c for c in group for _ in files] if batch > 1 else group[0]  # a batch's lanes, or every lane's one
                runner.run(streamed, lane_results, progress=True, on_frames=[f.record for f in lane_files],
                           on_step=lambda index: check(f"at frame {index} of {where}"))
            except Exception as error:
                if is_disk_full(error):  # no room for a file of the run: not this conversation's failure, stop
                    raise DiskFull.of(error) from None
                raise
        except Exception as error:  # recorded per conversation (those the batch finished stay whole); the others still run
            for result in [result for result in lane_results if not result.finished]:
                result.error = result.error or f"{type(error).__name__}: {error}"
            log.error("%s failed after %d frames: %s: %s", where, len(lane_results[0].trace), type(error).__name__, error)
        except BaseException as error:  # interrupted or a full disk: keep what each lane made, then stop
            peak = (lambda: peak_memory_mb(device)) if device is not None else None
            reason = error

            def keep(job_files: JobFiles, result: ConversationResult) -> None:
                """A conversation the batch finished, or that already failed alone, stays as it is; the others are partial."""
                if result.finished or result.error:
                    job_files.conversation_done(result)
                else:
                    job_files.stopped(result, reason, peak)

            full = each_lane(lane_files, keep, lane_results)
            if full is not None and not isinstance(error, DiskFull):
                raise full from None  # the predictions have no room: the files are incomplete, say so
            raise
        full = each_lane(lane_files, lambda job_files, result: job_files.conversation_done(result), lane_results)
        if full is not None:
            raise full
        check(f"after {where}")


def each_lane(files: Sequence[JobFiles], write: Any, lane_results: Sequence[ConversationResult]) -> DiskFull | None:
    """`write(job_files, result)` for every lane; a lane whose file has no room does not keep the others from
    writing theirs. Returns the first DiskFull, or None."""
    full = None
    for job_files, result in zip(files, lane_results):
        try:
            write(job_files, result)
        except DiskFull as error:
            log.error("predictions.json not written: %s", error)
            full = full or error
    return full
