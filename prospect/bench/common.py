"""What the stream and zoo benchmarks share: the bench video, the model with random weights, the report's header."""

from __future__ import annotations

import datetime
import random

from prospect.data.synthetic import draw_frame, plan_video
from prospect.data.types import Conversation, StreamFrame, Turn
from prospect.models.vlm import VisionLanguageModel, load_model
from prospect.tracking.results import environment
from prospect.validation import compose_config


class DrawnFrames:
    """Frames of a synthetic workbench video, drawn when asked for (see prospect.data.synthetic)."""

    def __init__(self, seconds: float, fps: float, seed: int = 0):
        self.plan = plan_video(0, seconds, fps, random.Random(seed))

    def image(self, original_index: int):
        return draw_frame(self.plan, min(original_index, self.plan.num_frames - 1))


def bench_conversation(seconds: float, fps: float, turns: int, frames: int | None = None) -> Conversation:
    """A conversation of seconds * fps + 1 frames with `turns` evenly spaced reference turns."""
    count = frames or int(seconds * fps) + 1
    source = DrawnFrames(seconds, fps)
    steps = source.plan.task.steps
    due = {round((i + 1) * count / (turns + 1)) for i in range(turns)}
    stream = []
    for k in range(count):
        before = (Turn("user", f"I want to do this: {source.plan.task.request}.", k / fps),) if k == 2 else ()
        reference = f"Now, {steps[len(stream) % len(steps)].lower()}." if k in due else None
        stream.append(StreamFrame(k, k, (k + 1) / fps, before, reference))
    return Conversation(
        id=f"bench/{count}f", video_uid="bench", subset="synthetic", user_type="bench", fps=fps,
        system_prompt="You are a proactive assistant. Watch the user and guide them step by step.",
        task_goal=source.plan.task.goal, knowledge="", add_knowledge=False, frames=stream, frame_source=source,
    )


def bench_videos(args) -> tuple[Conversation, Conversation]:
    """(the bench video: --seconds at --fps with --turns reference turns, a 24-frame warm-up video)."""
    return bench_conversation(args.seconds, args.fps, args.turns), bench_conversation(args.seconds, args.fps, 2, frames=24)


def bench_model(args) -> VisionLanguageModel:
    """The model config --model names, built with random weights (no download) on --device in --dtype."""
    cfg = compose_config([f"model={args.model}", "model.random_init=true", f"model.device={args.device}", f"model.dtype={args.dtype}"])
    return load_model(cfg.model, cfg.paths.cache_dir)


def report_header(args, model: VisionLanguageModel, conversation: Conversation) -> dict:
    """A report's first keys: when, where (device, library versions, commit), which model and which video."""
    env = environment(str(model.device))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": env["device_name"], "torch": env["torch"], "transformers": env["transformers"], "git_commit": env["git_commit"],
        "model": args.model, "dtype": str(model.dtype).removeprefix("torch."),
        "video": {"frames": conversation.num_frames, "reference_turns": len(conversation.references), "reply_tokens": args.reply_tokens},
    }
