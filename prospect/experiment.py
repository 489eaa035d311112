"""One run as a plain function (tests call it): config -> dataset -> model -> stream (strategy inside)
-> predictions.json + trace.jsonl -> evaluation -> results.json, plots, timeline -> W&B mirror.

Local files are the source of truth and are written first; results.json is written even when the run
fails, without losing the predictions already made.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from omegaconf import DictConfig, OmegaConf

from prospect.data import load_dataset
from prospect.eval import PREDICTIONS_SCHEMA
from prospect.data.types import Conversation
from prospect.stream.runner import ConversationResult, StreamSettings
from prospect.tracking.results import environment, job_key, results_document, stream_metrics

log = logging.getLogger(__name__)

OUTPUT_FILES = ("results.json", "predictions.json", "trace.jsonl", "timeline.html", "cache_sizes.png")


def stream_settings(cfg: DictConfig) -> StreamSettings:
    return StreamSettings(**OmegaConf.to_container(cfg.stream, resolve=True), seed=int(cfg.seed))


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
        if result.error:
            entry["error"] = result.error
        conversations.append(entry)
    return {"schema": PREDICTIONS_SCHEMA, "conversations": conversations}


def write_json(path: Path, document: Any) -> None:
    """Write atomically (a crash never leaves half a file)."""
    staging = path.with_suffix(path.suffix + ".tmp")
    staging.write_text(json.dumps(document, indent=1, ensure_ascii=False, default=str) + "\n")
    os.replace(staging, path)


def stream_conversations(
    runner: Any,
    conversations: Iterable[Conversation],
    output_dir: Path,
    on_result: Callable[[ConversationResult], None] | None = None,
    results: list[ConversationResult] | None = None,
) -> list[ConversationResult]:
    """Stream each conversation into `results` (appended as they start, so an interrupted run keeps them);
    predictions.json and trace.jsonl are updated after each one. A failing conversation is recorded
    (error) and the others still run."""
    results = [] if results is None else results
    trace_path = output_dir / "trace.jsonl"
    trace_path.write_text("")
    for conversation in conversations:
        result = ConversationResult(conversation)
        results.append(result)
        try:
            runner.run(conversation, result, progress=True)
        except Exception as error:  # recorded per conversation; the others still run
            result.error = f"{type(error).__name__}: {error}"
            log.error("conversation %s failed after %d frames: %s", conversation.id, len(result.trace), result.error)
        with trace_path.open("a", encoding="utf-8") as trace:
            for record in result.trace:
                trace.write(json.dumps(record, ensure_ascii=False) + "\n")
        write_json(output_dir / "predictions.json", predictions_document(results))
        for index, reply in sorted(result.replies.items()):
            log.info("%s @%.1fs: %s", conversation.id, conversation.frames[index].time, reply)
        if on_result is not None:
            on_result(result)
    return results


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


@contextlib.contextmanager
def recording_failure(report: RunReport) -> Iterator[None]:
    """Record an exception as the run's failure (status, error, traceback in the log) instead of raising;
    an interrupt (Ctrl-C, a scheduler's signal) is recorded too, then raised again."""
    try:
        yield
    except Exception as error:
        report.status, report.error = "failed", f"{type(error).__name__}: {error}"
        log.exception("run failed: %s", report.error)
    except BaseException as error:
        report.status, report.error = "failed", f"interrupted ({type(error).__name__})"
        raise


def score(report: RunReport, eval_cfg: DictConfig) -> None:
    """Evaluate the predictions made so far (ProAssist protocol) unless eval=none."""
    if eval_cfg.name != "none":
        from prospect.eval import evaluate_predictions

        report.evaluation = evaluate_predictions(predictions_document(report.results), eval_cfg)


def per_conversation_metrics(report: RunReport) -> dict[str, dict]:
    rows = {}
    for result in report.results:
        flat = stream_metrics([result.trace], result.peak_memory_mb, report.kv_bytes_per_token)
        if report.evaluation:
            flat.update(report.evaluation.get("per_conversation", {}).get(result.conversation.id, {}))
        if result.error:
            flat["error"] = result.error
        rows[result.conversation.id] = flat
    return rows


def summarize(report: RunReport) -> dict[str, Any]:
    """Flat metrics: stream figures plus the evaluation's (seed names where it had them)."""
    metrics = stream_metrics(
        [r.trace for r in report.results], max((r.peak_memory_mb for r in report.results), default=0.0), report.kv_bytes_per_token
    )
    if report.evaluation:
        metrics.update(report.evaluation["metrics"])
        metrics["dialogues_matched"] = report.evaluation["metrics"].get("num_matched", 0)
    return metrics


def console_summary(strategy: str, report: RunReport, metrics: dict, output_dir: Path) -> str:
    """The end-of-run summary in the seed's shape."""
    lines = [f"Strategy {strategy} {'completed' if report.status == 'ok' else 'FAILED: ' + str(report.error)}"]
    lines.append(f"  Generated: {metrics.get('dialogues_generated', 0)}")
    if "f1" in metrics:
        lines.append(f"  Matched: {metrics.get('dialogues_matched', 0)}")
        lines.append(f"  Precision: {metrics['precision']:.4f}  Recall: {metrics['recall']:.4f}  F1: {metrics['f1']:.4f}")
    reductions = [red for r in report.results for rec in r.trace for red in rec.get("reductions", [])]
    if reductions:
        before = sum(r["before"] for r in reductions) / len(reductions)
        after = sum(r["after"] for r in reductions) / len(reductions)
        lines.append(f"  Cache compression: {before:.0f}->{after:.0f} tokens (mean of {len(reductions)} reductions)")
    lines.append(f"  Time/frame: {metrics.get('time_per_frame', 0):.3f} s (p95 {metrics.get('time_per_frame_p95', 0):.3f} s)")
    lines.append(f"  Peak memory: {metrics.get('peak_memory_mb', 0):.1f} MB")
    lines.append(f"  Files: {output_dir}")
    return "\n".join(lines)


def finish_run(
    report: RunReport, output_dir: Path, config: dict, env: dict, key: str, strategy_name: str, max_seq_len: int | None = None,
    mirror: Any = None,
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
        metrics = summarize(report)
        extra = {"started_at": report.started_at, "finished_at": time.time()}
        if report.evaluation:
            extra.update({k: report.evaluation[k] for k in ("per_subset", "skipped") if k in report.evaluation})
        document = results_document(report.status, report.error, metrics, per_conversation_metrics(report), config, env, key, extra)
        write_json(output_dir / "results.json", document)
        records = [rec for r in report.results for rec in r.trace]
        try:
            from prospect.tracking.plots import plot_cache_sizes
            from prospect.tracking.timeline import write_timeline

            plot_cache_sizes(output_dir / "cache_sizes.png", records, title=f"{strategy_name}: cache length", max_seq_len=max_seq_len)
            write_timeline(output_dir / "timeline.html", predictions, records, title=f"{strategy_name} ({key})", max_seq_len=max_seq_len)
        except Exception as error:  # figures are a courtesy: they never cost the results
            log.warning("could not draw the plot/timeline: %s: %s", type(error).__name__, error)
        log.info("\n%s", console_summary(strategy_name, report, metrics, output_dir))
    except Exception as error:  # still leave a results.json that says what happened
        log.exception("could not write the results")
        report.status, report.error = "failed", f"writing results failed: {type(error).__name__}: {error}"
        document = results_document(report.status, report.error, metrics, {}, config, env, key)
        write_json(output_dir / "results.json", document)
    finally:
        if mirror is not None:
            mirror.finish(summary=metrics, predictions=predictions, exit_code=0 if report.status == "ok" else 1)
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
    """Run the experiment of `cfg` into `output_dir`; returns the results.json document."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    key = job_key(config)
    report = RunReport()
    mirror = None
    device = None
    if cfg.logger.name == "wandb":
        from prospect.tracking.wandb_mirror import WandbMirror

        mirror = WandbMirror()
        mirror.start(cfg.logger, output_dir, config, name=run_name(cfg))
    try:
        with recording_failure(report):
            loaded = load_dataset(cfg.dataset)
            if not loaded.conversations:
                raise RuntimeError(f"dataset {cfg.dataset.name}: no conversation to run ({len(loaded.skipped)} skipped)")
            runner, device = build_runner(cfg)
            report.kv_bytes_per_token = getattr(getattr(runner, "model", None), "kv_bytes_per_token", 0)
            log.info("%d conversations, job key %s", len(loaded.conversations), key)
            on_result = (lambda result: mirror.log_trace(result.trace)) if mirror is not None else None
            stream_conversations(runner, loaded.conversations, output_dir, on_result, report.results)
            score(report, cfg.eval)
    finally:  # also on KeyboardInterrupt: what was computed is written
        document = finish_run(
            report, output_dir, config, environment(device), key, str(cfg.strategy.name), int(cfg.strategy.max_seq_len), mirror
        )
    return document
