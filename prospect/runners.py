"""The seed's Python API, kept for its users, on top of prospect's stream runner:

    from prospect.runners import VLMStreamRunner
    runner = VLMStreamRunner(model_name="HuggingFaceTB/SmolVLM2-2.2B-Instruct", device="cuda",
                             torch_dtype="bfloat16", max_new_tokens=100, temperature=0.0, use_kv_cache=True,
                             context_strategy_type="drop_middle", context_strategy_config={"last_keep_len": 512})
    results = runner.run_inference_on_video({"video_id": ..., "frames": [PIL images], "conversation": turns, "fps": 2.0})
    runner.cache_manager.get_cache_length()

`model_name` is a model config name (conf/model/*.yaml, e.g. offline_smollm2, tiny_random), a hub id
or a local directory. `conversation` is ProAssist prepared turns (with `frames` turns) or timestamped
turns ({role, content, time}); frame i of `frames` is frame i of the video. With timestamped turns
every frame given is streamed (the frames after the last turn too); with prepared turns the `frames`
turns say which frames are streamed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from prospect.context_strategies import BaseContextStrategy, create_strategy
from prospect.data.proassist import conversation_from_images
from prospect.models.vlm import VisionLanguageModel, load_model
from prospect.stream.frame_record import ConversationResult
from prospect.stream.runner import StreamRunner
from prospect.stream.settings import StreamSettings
from prospect.tracking.results import stream_metrics
from prospect.conf_files import CONF_DIR

log = logging.getLogger(__name__)


def model_config(model_name: str, device: str, torch_dtype: str) -> Any:
    """A `model` group config for a config name, a local directory or a hub id."""
    path = CONF_DIR / "model" / f"{model_name}.yaml"
    if path.is_file():
        cfg = OmegaConf.load(path)
    else:
        local = Path(model_name).expanduser()
        cfg = OmegaConf.create(
            {
                "name": model_name,
                "hub_id": None if local.is_dir() else model_name,
                "path": str(local) if local.is_dir() else None,
                "architecture": None,
                "random_init": False,
                "chat_format": "smolvlm",
            }
        )
    cfg.device, cfg.dtype = device, torch_dtype
    return cfg


class CacheView:
    """Read access to the runner's current KV cache (the seed's `cache_manager`)."""

    def __init__(self, runner: StreamRunner):
        self._runner = runner

    def get_cache(self):
        return self._runner.cache

    def has_cache(self) -> bool:
        return self._runner.cache is not None and self.get_cache_length() > 0

    def get_cache_length(self) -> int:
        return 0 if self._runner.cache is None else self._runner.cache.get_seq_length()

    def get_cache_stats(self) -> dict:
        cache = self._runner.cache
        return {"length": self.get_cache_length(), "next_position": 0 if cache is None else cache.next_position}


class VLMStreamRunner:
    """The seed's runner: a model, a context strategy and stream settings behind one object."""

    def __init__(
        self,
        model_name: str,
        device: str = "auto",
        torch_dtype: str = "auto",
        max_new_tokens: int = 100,
        temperature: float = 0.0,
        top_p: float = 1.0,
        use_kv_cache: bool = True,
        context_strategy_type: str = "none",
        context_strategy_config: dict | None = None,
        max_seq_len: int = 4096,
        reserved_seq_len: int = 128,
        talk_policy: str = "gt_turns",
        not_talk_threshold: float = 0.5,
        cache_dir: str | None = None,
        seed: int = 0,
        strategy: BaseContextStrategy | None = None,
        model: VisionLanguageModel | None = None,
    ):
        if not use_kv_cache and context_strategy_type != "none":
            log.warning("use_kv_cache=False: every step starts fresh, i.e. strategy 'none' (not %s)", context_strategy_type)
            context_strategy_type = "none"
        params = {"max_seq_len": max_seq_len, "reserved_seq_len": reserved_seq_len, **(context_strategy_config or {})}
        self.context_strategy = strategy or create_strategy(context_strategy_type, **params)
        cache_dir = cache_dir or os.environ.get("PROSPECT_CACHE_DIR", str(Path.home() / ".cache" / "prospect"))
        self.model = model or load_model(model_config(model_name, device, torch_dtype), cache_dir, seed=seed)
        settings = StreamSettings(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, talk_policy=talk_policy,
            talk_threshold=not_talk_threshold, seed=seed,
        )
        self.stream = StreamRunner(self.model, self.context_strategy, settings)
        self.cache_manager = CacheView(self.stream)

    def run_inference_on_video(self, video: dict) -> dict:
        """Stream one video; returns predictions (frames with gen or ref), the per-frame trace and counts."""
        missing = [key for key in ("video_id", "frames", "conversation", "fps") if key not in video]
        if missing:
            raise ValueError(f"video dict is missing {', '.join(missing)}")
        conversation = conversation_from_images(
            str(video["video_id"]), list(video["frames"]), list(video["conversation"]), float(video["fps"]),
            user_type=str(video.get("user_type", "unknown")),
        )
        result = self.stream.run(conversation, ConversationResult(conversation))
        return summarize_result(result, getattr(self.model, "kv_bytes_per_token", 0))


def summarize_result(result: ConversationResult, kv_bytes_per_token: int = 0) -> dict:
    """The seed's result dict: predictions, trace and the stream metrics results.json reports.

    kv_bytes_per_token: the model's (VisionLanguageModel.kv_bytes_per_token); kv_cache_peak_mb is
    max_cache_size x kv_bytes_per_token, as in results.json (0 without it)."""
    return {
        "video_id": result.conversation.video_uid,
        "predictions": result.prediction_frames(),
        "trace": result.trace,
        **stream_metrics([result.trace], result.peak_memory_mb, kv_bytes_per_token),
    }
