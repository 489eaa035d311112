"""One run as a plain function (tests call it): config -> dataset -> model -> stream (strategy inside)
-> predictions.json + trace.jsonl -> evaluation -> results.json, plots, timeline -> W&B mirror.

Local files are the source of truth and are written first; results.json is written even when the run
fails, without losing the predictions already made.

Interruptions (README "Interruptions and preemption"): while a run is on, SIGINT, SIGTERM and SIGUSR2
(submitit's preemption/time-limit signal) only set a flag (`StopSignals`); the stream stops at the next
safe point, after the frame in progress, by raising `Interrupted`. trace.jsonl is appended and flushed
frame by frame, predictions.json gets the replies of the conversation in progress (marked partial),
results.json says failed and names the signal, W&B finishes with exit code 128 + the signal's number, and
`python -m prospect.run` exits with that code (130, 143, 140). The same signal a second time stops at once.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

from omegaconf import DictConfig, OmegaConf

from prospect.data import load_dataset
from prospect.signals import Interrupted, StopSignals
from prospect.eval import PREDICTIONS_SCHEMA
from prospect.eval.intervals import intervals, interval_summary
from prospect.eval.stream_scores import SPEAK_FIELD
from prospect.data.types import Conversation
from prospect.stream.runner import ConversationResult
from prospect.stream.settings import stream_settings
from prospect.tracking.console import console_summary
from prospect.tracking.results import environment, job_key, results_document, stream_metrics

log = logging.getLogger(__name__)

OUTPUT_FILES = ("results.json", "predictions.json", "trace.jsonl", "timeline.html", "cache_sizes.png")


def predictions_document(results: list[ConversationResult]) -> dict:
    """predictions.json: per conversation, the frames where the model spoke or a reference exists."""
    conversations = []
    for result in results:
        c = result.conversation
        entry = {
            "id": c.id,
            "video_uid": c.video_uid,
            "subset": c.subset,
            "user_type": c.user_type,
            "fps": c.fps,
            "num_frames": c.num_frames,
            "frames": result.prediction_frames(),
        }
        speak = result.speak_probabilities()
        if speak is not None:
            entry[SPEAK_FIELD] = speak
        if result.error:
            entry["error"] = result.error
        partial = getattr(result, "partial", None)
        if partial:  # interrupted: the replies up to the frame it stopped at (skipped by evaluation: error)
            entry["partial"] = True
            entry.update(partial)
        conversations.append(entry)
    return {"schema": PREDICTIONS_SCHEMA, "conversations": conversations}


def write_json(path: Path, document: Any) -> None:
    """Write atomically (a crash never leaves half a file)."""
    staging = path.with_suffix(path.suffix + ".tmp")
    staging.write_text(json.dumps(document, indent=1, ensure_ascii=False, default=str) + "\n")
    os.replace(staging, path)


@dataclass
class StreamedConversation(ConversationResult):
    """A ConversationResult that can say it was cut short: `partial` = {"frames_streamed", "stopped_at"}."""

    partial: dict | None = None


def _takes_on_frame(runner: Any) -> bool:
    try:
        return "on_frame" in inspect.signature(runner.run).parameters
    except (TypeError, ValueError):
        return False


class JobFiles:
    """A job's streamed outputs: trace.jsonl gets each frame's record as soon as the frame is processed
    (appended and flushed) and `on_record(record)` follows (the W&B mirror); predictions.json is rewritten
    after each conversation, and when anything stops the stream with the replies of the conversation in
    progress, marked partial."""

    def __init__(self, output_dir: Path, results: list[ConversationResult], on_record: Callable[[dict], None] | None = None):
        self.output_dir, self.results, self.on_record = output_dir, results, on_record
        self.trace = (output_dir / "trace.jsonl").open("w", encoding="utf-8")

    def record(self, record: dict) -> None:
        self.trace.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.trace.flush()
        if self.on_record is not None:
            self.on_record(record)

    def predictions(self) -> None:
        write_json(self.output_dir / "predictions.json", predictions_document(self.results))

    def conversation_done(self, result: ConversationResult) -> None:
        self.predictions()
        for index, reply in sorted(result.replies.items()):
            log.info("%s @%.1fs: %s", result.conversation.id, result.conversation.frames[index].time, reply)

    def stopped(self, result: StreamedConversation, runner: Any, error: BaseException) -> None:
        _mark_partial(result, runner, error)
        self.predictions()

    def close(self) -> None:
        self.trace.close()


def _conversation_failed(result: ConversationResult, error: Exception) -> None:
    result.error = f"{type(error).__name__}: {error}"
    log.error("conversation %s failed after %d frames: %s", result.conversation.id, len(result.trace), result.error)


def stream_conversations(
    runner: Any,
    conversations: Iterable[Conversation],
    output_dir: Path,
    on_result: Callable[[ConversationResult], None] | None = None,
    results: list[ConversationResult] | None = None,
    on_record: Callable[[dict], None] | None = None,
    stop: StopSignals | None = None,
) -> list[ConversationResult]:
    """Stream each conversation into `results` (appended as they start, so an interrupted run keeps them),
    writing the job's files as it goes (JobFiles). After each frame `stop.check()` may end the run with
    `Interrupted`. A failing conversation is recorded (error) and the others still run. A runner whose run()
    takes no `on_frame` gets its records written after each conversation."""
    results = [] if results is None else results
    per_frame = _takes_on_frame(runner)
    files = JobFiles(output_dir, results, on_record)

    def on_frame(record: dict) -> None:  # the safe point between frames
        files.record(record)
        if stop is not None:
            stop.check(f"at frame {record['index']} of conversation {record['conversation']}")

    try:
        for conversation in conversations:
            result = StreamedConversation(conversation)
            results.append(result)
            try:
                if per_frame:
                    runner.run(conversation, result, progress=True, on_frame=on_frame)
                else:
                    runner.run(conversation, result, progress=True)
            except Exception as error:  # recorded per conversation; the others still run
                _conversation_failed(result, error)
            except BaseException as error:  # interrupted: keep what this conversation made, then stop
                if not per_frame:
                    for record in result.trace:
                        files.record(record)
                files.stopped(result, runner, error)
                raise
            if not per_frame:
                for record in result.trace:
                    files.record(record)
            files.conversation_done(result)
            if on_result is not None:
                on_result(result)
            if stop is not None:
                stop.check(f"after conversation {conversation.id}")
    finally:
        files.close()
    return results


def _mark_partial(result: StreamedConversation, runner: Any, error: BaseException) -> None:
    """Mark the conversation in progress as cut short by `error`: what was streamed stays."""
    last = result.trace[-1] if result.trace else None
    result.partial = {
        "frames_streamed": len(result.trace),
        "stopped_at": None if last is None else {"index": last["index"], "time": last["time"]},
    }
    reason = str(error) if isinstance(error, Interrupted) else f"interrupted ({type(error).__name__})"
    result.error = f"{reason}; partial: {len(result.trace)} of {result.conversation.num_frames} frames streamed"
    device = getattr(getattr(runner, "model", None), "device", None)
    if device is not None and not result.peak_memory_mb:
        from prospect.stream.runner import peak_memory_mb

        with contextlib.suppress(Exception):
            result.peak_memory_mb = peak_memory_mb(device)


def build_runner(cfg: DictConfig):
    """The stream runner of the config: the oracle, or a model under a context strategy."""
    if cfg.model.get("oracle"):
        from prospect.stream.oracle import OracleRunner

        return OracleRunner(), "cpu"
    from prospect.context_strategies import strategy_from_config
    from prospect.models.vlm import load_model
    from prospect.stream.runner import StreamRunner

    model = load_model(cfg.model, cfg.paths.cache_dir, seed=int(cfg.seed))
    strategy = strategy_from_config(cfg.strategy)
    log.info(
        "model %s (%s, %s), strategy %s", model.name, model.device, str(model.dtype).removeprefix("torch."), strategy.name
    )
    return StreamRunner(model, strategy, stream_settings(cfg)), str(model.device)


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
    an interrupt (Ctrl-C, a scheduler's signal) is recorded too, then raised again."""
    try:
        yield
    except Exception as error:
        report.status, report.error = "failed", f"{type(error).__name__}: {error}"
        log.exception("run failed: %s", report.error)
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
        from prospect.eval import evaluate_predictions

        report.evaluation = evaluate_predictions(predictions_document(report.results), eval_cfg)


def scored(report: RunReport, predictions: dict) -> dict:
    """The evaluation, or without one (eval=none, or a run stopped before it) the stream's own measurements
    of the predictions (reference scores, P(speak)): {"metrics", "per_conversation", ...}."""
    if report.evaluation:
        return report.evaluation
    from prospect.eval import measured_scores

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
    """Write results.json, the plot and the timeline, print the summary, close the W&B mirror (always)."""
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
            from prospect.tracking.plots import plot_cache_sizes
            from prospect.tracking.timeline import write_timeline

            plot_cache_sizes(output_dir / "cache_sizes.png", records, title=f"{strategy_name}: cache length", max_seq_len=max_seq_len)
            write_timeline(output_dir / "timeline.html", predictions, records, title=f"{strategy_name} ({key})", max_seq_len=max_seq_len)
        except Exception as error:  # figures are a courtesy: they never cost the results
            log.warning("could not draw the plot/timeline: %s: %s", type(error).__name__, error)
        log.info("\n%s", console_summary(strategy_name, report.status, report.error, metrics, report.results, output_dir))
    except Exception as error:  # still leave a results.json that says what happened
        log.exception("could not write the results")
        report.status, report.error = "failed", f"writing results failed: {type(error).__name__}: {error}"
        document = results_document(report.status, report.error, metrics, {}, config, env, key)
        write_json(output_dir / "results.json", document)
    finally:
        if mirror is not None:
            exit_code = report.exit_code if report.exit_code is not None else 0 if report.status == "ok" else 1
            mirror.finish(summary={**metrics, **interval_summary(document.get("intervals", {}))}, predictions=predictions,
                          exit_code=exit_code)
    return document


def run_name(cfg: DictConfig) -> str:
    if cfg.logger.get("job_name"):
        return str(cfg.logger.job_name)
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().job.override_dirname
    except ValueError:  # not inside a Hydra app
        overrides = ""
    return f"{cfg.strategy.name}{'-' + overrides if overrides else ''}"


def run(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Run the experiment of `cfg` into `output_dir`; returns the results.json document.

    SIGINT/SIGTERM/SIGUSR2 stop it at the next safe point (module docstring): the files are written, then
    `Interrupted` is raised. A signal that comes once the last frame is streamed lets the run finish (its
    result stands, status ok) and `Interrupted` is raised after the files are written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    key = job_key(config)
    report = RunReport()
    mirror = None
    device = None
    with StopSignals.current() as stop:
        if cfg.logger.name == "wandb":
            from prospect.tracking.wandb_mirror import WandbMirror

            mirror = WandbMirror()
            mirror.start(cfg.logger, output_dir, config, name=run_name(cfg))
        try:
            with recording_failure(report):
                loaded = load_dataset(cfg.dataset)
                stop.check("while loading the dataset, before the stream started")
                if not loaded.conversations:
                    raise RuntimeError(f"dataset {cfg.dataset.name}: no conversation to run ({len(loaded.skipped)} skipped)")
                runner, device = build_runner(cfg)
                stop.check("while loading the model, before the stream started")
                report.kv_bytes_per_token = getattr(getattr(runner, "model", None), "kv_bytes_per_token", 0)
                log.info("%d conversations, job key %s", len(loaded.conversations), key)
                on_record = (lambda record: mirror.log_trace([record])) if mirror is not None else None  # per frame
                stream_conversations(runner, loaded.conversations, output_dir, None, report.results, on_record, stop)
                score(report, cfg.eval)
        finally:  # also when interrupted: what was computed is written
            stop.writing = True
            try:
                document = finish_run(
                    report, output_dir, config, environment(device), key, str(cfg.strategy.name), int(cfg.strategy.max_seq_len), mirror
                )
            finally:
                stop.writing = False
        stop.check("after the run finished (its results are complete)")
    return document



def _lane_stream(runner: Any, conversations: Iterable[Conversation], files: list["JobFiles"], results: list[list], stop: StopSignals) -> None:
    """stream_conversations for the lanes of a LaneRunner: each lane's files are written as its job's."""
    for conversation in conversations:
        lane_results = [StreamedConversation(conversation) for _ in files]
        for job_results, result in zip(results, lane_results):
            job_results.append(result)
        try:
            runner.run(conversation, lane_results, progress=True, on_frames=[f.record for f in files],
                       on_step=lambda index: stop.check(f"at frame {index} of conversation {conversation.id}"))
        except Exception as error:  # a failure of what the lanes share (frames, vision): every lane's conversation
            for result in lane_results:
                result.error = result.error or f"{type(error).__name__}: {error}"
            log.error("conversation %s failed in every lane: %s: %s", conversation.id, type(error).__name__, error)
        except BaseException as error:  # interrupted: keep what each lane made, then stop
            for job_files, result in zip(files, lane_results):
                job_files.stopped(result, runner, error)
            raise
        for job_files, result in zip(files, lane_results):
            job_files.conversation_done(result)
        stop.check(f"after conversation {conversation.id}")


def run_lanes(cfgs: list[DictConfig], output_dirs: list[str | Path], batch_lanes: bool | None = None) -> list[dict]:
    """Run jobs that differ only in their strategy as lanes of one process (prospect.stream.lanes): the
    dataset and model are loaded once, each frame's vision features computed once, and each job writes
    exactly the files `run` writes (results.json with its job key, predictions, trace, plots, its own W&B
    run) into its own folder. A job whose strategy cannot be built, or whose lane raises, is recorded failed
    and the others go on. Lanes run the optimized step: `stream.optimized: auto` is settled to true before the
    job keys are computed. Signals stop every lane at the next frame, as `run` stops (module docstring).
    `batch_lanes` (prospect.stream.lanes.LaneRunner): None batches the lanes' steps where CUDA graphs run.
    Returns the results.json documents, in order."""
    from omegaconf import open_dict

    if len(cfgs) != len(output_dirs) or not cfgs:
        raise ValueError(f"run_lanes: {len(cfgs)} configs for {len(output_dirs)} output folders")
    if any(cfg.model.get("oracle") for cfg in cfgs):  # no model, nothing to share
        return [run(cfg, output_dir) for cfg, output_dir in zip(cfgs, output_dirs)]
    for cfg in cfgs:
        if cfg.stream.optimized == "auto":
            with open_dict(cfg):
                cfg.stream.optimized = True
    dirs = [Path(d) for d in output_dirs]
    for folder in dirs:
        folder.mkdir(parents=True, exist_ok=True)
    configs = [OmegaConf.to_container(cfg, resolve=True) for cfg in cfgs]
    keys = [job_key(config) for config in configs]
    shared_parts = [{k: v for k, v in config.items() if k not in ("strategy", "logger")} for config in configs]
    reports = [RunReport() for _ in cfgs]
    shared = RunReport()  # a failure of what the lanes share is every job's failure
    mirrors: list[Any] = [None] * len(cfgs)
    device = None
    lanes_info: dict[str, Any] = {"jobs": len(cfgs), "job_keys": keys}
    with StopSignals.current() as stop:
        for index, cfg in enumerate(cfgs):
            if cfg.logger.name == "wandb":
                from prospect.tracking.wandb_mirror import WandbMirror

                mirrors[index] = WandbMirror()
                mirrors[index].start(cfg.logger, dirs[index], configs[index], name=run_name(cfg), concurrent=True)
        try:
            with recording_failure(shared):
                if any(part != shared_parts[0] for part in shared_parts):
                    raise ValueError("run_lanes: the jobs differ in more than their strategy (and logger)")
                loaded = load_dataset(cfgs[0].dataset)
                stop.check("while loading the dataset, before the stream started")
                if not loaded.conversations:
                    raise RuntimeError(f"dataset {cfgs[0].dataset.name}: no conversation to run ({len(loaded.skipped)} skipped)")
                from prospect.context_strategies import strategy_from_config
                from prospect.models.vlm import load_model
                from prospect.stream.lanes import LaneRunner

                settings = stream_settings(cfgs[0])
                model = load_model(cfgs[0].model, cfgs[0].paths.cache_dir, seed=int(cfgs[0].seed))
                device = str(model.device)
                stop.check("while loading the model, before the stream started")
                from prospect.validation import validate

                strategies, live = [], []
                for index, cfg in enumerate(cfgs):
                    reports[index].kv_bytes_per_token = model.kv_bytes_per_token
                    with recording_failure(reports[index]):  # a job whose config is bad fails alone
                        validate(cfg)
                        strategies.append(strategy_from_config(cfg.strategy))
                        live.append(index)
                if not live:
                    raise RuntimeError("no job of this lane set could start (see each job's error)")
                runner = LaneRunner(model, strategies, settings, batch_lanes=batch_lanes)
                lanes_info.update(lanes=len(live), batched=runner.static.batch_lanes)
                log.info("%d lanes (%s) on %s, %d conversations", len(live), ", ".join(s.name for s in strategies), device,
                         len(loaded.conversations))
                files = [JobFiles(dirs[i], reports[i].results,
                                  (lambda record, m=mirrors[i]: m.log_trace([record])) if mirrors[i] is not None else None) for i in live]
                try:
                    _lane_stream(runner, loaded.conversations, files, [reports[i].results for i in live], stop)
                finally:
                    for job_files in files:
                        job_files.close()
                for index in live:
                    with recording_failure(reports[index]):
                        score(reports[index], cfgs[index].eval)
        finally:  # also when interrupted: what was computed is written, job by job
            stop.writing = True
            documents = []
            try:
                for index, cfg in enumerate(cfgs):
                    report = reports[index]
                    if shared.status != "ok" and report.status == "ok":
                        report.status, report.error, report.exit_code = shared.status, shared.error, shared.exit_code
                    documents.append(finish_run(
                        report, dirs[index], configs[index], environment(device), keys[index], str(cfg.strategy.name),
                        int(cfg.strategy.max_seq_len), mirrors[index], extra={"lanes": {**lanes_info, "job": index}},
                    ))
            finally:
                stop.writing = False
        stop.check("after the run finished (its results are complete)")
    return documents
