"""The seed's batch API: stream a dataset with a runner, evaluate, write the same files as a Hydra run.

    from prospect.generators import BaselineGenerator
    metrics = BaselineGenerator(runner=runner, dataset=dataset, output_dir="outputs/my_experiment").run()
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prospect.data.proassist import LoadedDataset, conversation_from_images, with_unique_ids
from prospect.data.types import Conversation
from prospect.experiment import RunReport, finish_run, recording_failure, score, stream_jobs
from prospect.stream.lanes import OneLane
from prospect.tracking.job_files import JobFiles
from prospect.tracking.results import environment, job_key
from prospect.validation import compose_config


def _conversations(dataset: Any) -> list[Conversation]:
    """The dataset's conversations, each id unique (a repeated one gets `#N`, with a warning)."""
    if isinstance(dataset, LoadedDataset):
        return with_unique_ids(list(dataset.conversations))
    items = list(dataset)
    return with_unique_ids([
        item if isinstance(item, Conversation) else conversation_from_images(
            str(item["video_id"]), list(item["frames"]), list(item["conversation"]), float(item["fps"]),
            user_type=str(item.get("user_type", "unknown")),
        )
        for item in items
    ])


class BaselineGenerator:
    """runner: a prospect.runners.VLMStreamRunner or a prospect.stream.StreamRunner; dataset: a LoadedDataset,
    a list of Conversations, or the seed's video dicts; eval_cfg: an `eval` config group (default eval=offline)."""

    def __init__(self, runner: Any, dataset: Any, output_dir: str | Path, eval_cfg: DictConfig | dict | None = None):
        self.runner = getattr(runner, "stream", runner)
        self.conversations = _conversations(dataset)
        self.output_dir = Path(output_dir)
        if eval_cfg is None:
            eval_cfg = compose_config(["eval=offline"]).eval
        self.eval_cfg = eval_cfg if isinstance(eval_cfg, DictConfig) else OmegaConf.create(eval_cfg)

    def _config(self) -> dict:
        strategy = getattr(self.runner, "strategy", None)
        model = getattr(self.runner, "model", None)
        settings = getattr(self.runner, "settings", None)
        strategy_params = {"_target_": f"{type(strategy).__module__}.{type(strategy).__name__}"} if strategy else {}
        if strategy is not None and dataclasses.is_dataclass(strategy):
            strategy_params.update(dataclasses.asdict(strategy))
        return {
            "model": {"name": getattr(model, "name", "oracle")},
            "strategy": {"name": getattr(strategy, "name", "none"), **strategy_params},
            "dataset": {"conversations": [c.id for c in self.conversations]},
            "eval": OmegaConf.to_container(self.eval_cfg, resolve=True),
            "stream": dataclasses.asdict(settings) if settings is not None else {},
            "seed": getattr(settings, "seed", 0),
        }

    def run(self) -> dict:
        """Stream, evaluate and write results.json, predictions.json, trace.jsonl, timeline.html and the
        cache plot into output_dir; returns the flat metrics."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        config = self._config()
        report = RunReport(kv_bytes_per_token=getattr(getattr(self.runner, "model", None), "kv_bytes_per_token", 0))
        try:
            with recording_failure(report):
                files = JobFiles(self.output_dir, report.results)
                try:
                    stream_jobs(OneLane(self.runner), self.conversations, [files], [report.results])
                finally:
                    files.close()
                score(report, self.eval_cfg)
        finally:
            model = getattr(self.runner, "model", None)
            strategy = getattr(self.runner, "strategy", None)
            document = finish_run(
                report, self.output_dir, config, environment(str(getattr(model, "device", "cpu"))), job_key(config),
                getattr(strategy, "name", "oracle"), getattr(strategy, "max_seq_len", None),
            )
        return document["metrics"]
