"""How a stream feeds frames and decodes replies (`stream.*` of the config), and the checks on it.

Light on purpose (no torch): validation checks a config with these before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from prospect.typed_fields import check_field_types

TALK_POLICIES = ("gt_turns", "threshold")
STREAM_MEASUREMENTS = ("reference_scores", "speak_probe")  # StreamSettings fields set from the eval config group
GPU_SHARE_ENV = "PROSPECT_JOBS_PER_GPU"  # set by the gpu_pool launcher: jobs sharing a GPU (conversation_batch=auto takes its share)


@dataclass
class StreamSettings:
    """How frames are fed and replies decoded. Token counts are tokens, thresholds probabilities."""

    max_new_tokens: int = 100
    talk_policy: str = "gt_turns"
    talk_threshold: float = 0.5
    temperature: float = 0.0
    top_p: float = 1.0
    min_new_tokens: int = 1  # the end of turn is excluded before this many tokens (a reply was asked for)
    frame_stride: int = 1
    seed: int = 0
    # Speed (same semantics): "auto" = on CUDA. Frames are known ahead in offline evaluation, so the vision
    # tower encodes vision_batch_size frames per call; optimized runs the language model over the fixed-size
    # KV buffer with a mask and replays CUDA graphs (prospect/models/static_forward.py).
    vision_batch_size: int | str = "auto"
    optimized: bool | str = "auto"
    compile: bool | str = "auto"  # the optimized step's norms and MLPs through torch.compile (auto: on CUDA)
    # conversations of the dataset streamed at once, as lanes of one model (auto: by free GPU memory, 1 on CPU)
    conversation_batch: int | str = "auto"
    # Measurements that leave the stream as it is (set from eval.reference_scores / eval.speak_probe):
    # teacher-forced scores of each reference reply, and P(speak) at frames where gt_turns stays silent.
    reference_scores: bool = True
    speak_probe: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.talk_policy not in TALK_POLICIES:
            raise ValueError(f"talk_policy={self.talk_policy}: choose one of: {', '.join(TALK_POLICIES)}")
        for name in ("frame_stride", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens}: must be in [0, max_new_tokens={self.max_new_tokens}]")
        for name, low, high in (("talk_threshold", 0.0, 1.0), ("temperature", 0.0, 100.0)):
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [{low}, {high}]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0.0, 1.0]")
        for name in ("optimized", "compile"):
            if getattr(self, name) not in ("auto", True, False):
                raise ValueError(f"{name}={getattr(self, name)}: choose one of: auto, true, false")
        for name in ("vision_batch_size", "conversation_batch"):
            value = getattr(self, name)
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                shown = repr(value) if isinstance(value, str) else "null" if value is None else value  # '2' is text, not 2
                raise ValueError(f"{name}={shown}: must be auto or an integer >= 1")
        if self.optimized is False and self.conversation_batch not in ("auto", 1):
            raise ValueError(f"conversation_batch={self.conversation_batch}: conversations stream as lanes on the optimized step "
                             f"only (stream.optimized=false); use 1")


def check_reply_fits(strategy: Any, settings: StreamSettings) -> None:
    """A reply of max_new_tokens must fit under the strategy's reduction threshold."""
    room = strategy.max_seq_len - strategy.reserved_seq_len
    if settings.max_new_tokens >= room:
        raise ValueError(f"max_new_tokens={settings.max_new_tokens}: must be < max_seq_len - reserved_seq_len ({room})")


def stream_settings(cfg: Any) -> StreamSettings:
    """The stream settings of a composed config: `stream.*`, the seed, and the measurements `eval` asks of
    the stream."""
    return StreamSettings(**OmegaConf.to_container(cfg.stream, resolve=True), seed=int(cfg.seed),
                          **{key: bool(cfg.eval.get(key, True)) for key in STREAM_MEASUREMENTS})
