"""One run as a plain function (tests call it): config -> dataset -> model -> stream (strategy inside)
-> predictions.json + trace.jsonl in the run directory."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from prospect.context_strategies import strategy_from_config
from prospect.data import load_dataset
from prospect.models.vlm import load_model
from prospect.stream.runner import ConversationResult, StreamRunner, StreamSettings

log = logging.getLogger(__name__)

PREDICTIONS_SCHEMA = "prospect.predictions/1"


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


def write_json(path: Path, document: dict) -> None:
    """Write atomically (a crash never leaves half a file)."""
    staging = path.with_suffix(path.suffix + ".tmp")
    staging.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    os.replace(staging, path)


def run(cfg: DictConfig, output_dir: str | Path) -> list[ConversationResult]:
    """Stream every conversation of the dataset; files are updated after each conversation."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_dataset(cfg.dataset)
    if not loaded.conversations:
        raise RuntimeError(f"dataset {cfg.dataset.name}: no conversation to run ({len(loaded.skipped)} skipped)")
    model = load_model(cfg.model, cfg.paths.cache_dir, seed=int(cfg.seed))
    strategy = strategy_from_config(cfg.strategy)
    runner = StreamRunner(model, strategy, stream_settings(cfg))
    log.info(
        "model %s (%s, %s), strategy %s, %d conversations", model.name, model.device, str(model.dtype).removeprefix("torch."),
        strategy.name, len(loaded.conversations),
    )
    results: list[ConversationResult] = []
    trace_path = output_dir / "trace.jsonl"
    trace_path.write_text("")
    for conversation in loaded.conversations:
        result = ConversationResult(conversation)
        results.append(result)
        try:
            runner.run(conversation, result, progress=True)
        except Exception as error:  # recorded per conversation; the others still run
            result.error = f"{type(error).__name__}: {error}"
            log.error("conversation %s failed at frame %d: %s", conversation.id, len(result.trace), result.error)
        with trace_path.open("a", encoding="utf-8") as trace:
            for record in result.trace:
                trace.write(json.dumps(record, ensure_ascii=False) + "\n")
        write_json(output_dir / "predictions.json", predictions_document(results))
        for index, reply in sorted(result.replies.items()):
            log.info("%s @%.1fs: %s", conversation.id, conversation.frames[index].time, reply)
    return results
