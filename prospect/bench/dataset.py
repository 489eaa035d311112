"""`python -m prospect.bench dataset`: a dataset's conversations one after the other against several at once.

Builds the model with random weights (no download) and `--conversations` synthetic conversations of mixed
length (from a quarter of `--seconds` up to `--seconds`, evenly spread, each with reference turns in proportion
to its length, replies of exactly `--reply-tokens` tokens), then streams them under drop_middle (`--max-seq-len`,
`--reserved`, `--last-keep`) twice in the same process: one conversation at a time (conversation_batch 1) and
`--conversation-batch` at once as lanes of one model (stream.conversation_batch, docs/stream.md). Each run
follows a warm-up of the same lanes (graph capture; the process's first compilation goes to the first
warm-up). It reports frames per second of each, their ratio, peak memory, and how many of the batched run's
greedy replies equal the one-by-one run's (on the CPU all of them; on a GPU in bf16 a batch's matrix products
round differently from one lane's, docs/performance.md).
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from prospect.bench.common import bench_conversation, bench_model, report_header
from prospect.context_strategies import DropMiddle
from prospect.data.types import Conversation
from prospect.stream.feed import peak_memory_mb, synchronize
from prospect.stream.lanes import LaneRunner
from prospect.stream.settings import StreamSettings

log = logging.getLogger(__name__)


def mixed_conversations(args) -> list[Conversation]:
    """`--conversations` bench videos from --seconds / 4 (at least 16 frames) up to --seconds, evenly spread,
    references in proportion."""
    count = args.conversations
    low = min(args.seconds, max(args.seconds / 4, 16 / args.fps))  # a bench video has at least 16 frames
    out = []
    for i in range(count):
        seconds = low + (args.seconds - low) * i / max(1, count - 1)
        turns = max(1, round(args.turns * seconds / args.seconds))
        conversation = bench_conversation(seconds, args.fps, turns)
        conversation.id = f"bench/{i:02d}/{conversation.num_frames}f"
        out.append(conversation)
    return out


def stream_in_batches(model, strategy, settings: StreamSettings, conversations: list[Conversation], batch: int) -> tuple[float, dict]:
    """(seconds, {conversation id: replies}) of streaming `conversations` `batch` at a time as lanes of one
    LaneRunner (after a warm-up of the same lanes on short videos)."""
    runner = LaneRunner(model, [copy.deepcopy(strategy) for _ in range(batch)], settings)
    warmups = [bench_conversation(12, 2, 2, frames=24 + 4 * i) for i in range(batch)]
    runner.run(warmups)
    synchronize(model.device)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    replies = {}
    conversations = sorted(conversations, key=lambda conversation: -conversation.num_frames)  # as stream_jobs batches them
    started = time.perf_counter()
    for start in range(0, len(conversations), batch):
        group = conversations[start : start + batch]
        for result in runner.run(group):
            if result.error:
                raise RuntimeError(f"{result.conversation.id}: {result.error}")
            replies[result.conversation.id] = result.replies
    synchronize(model.device)
    return time.perf_counter() - started, replies


def run_dataset(args) -> dict:
    model = bench_model(args)
    conversations = mixed_conversations(args)
    frames = sum(c.num_frames for c in conversations)
    strategy = DropMiddle(max_seq_len=args.max_seq_len, reserved_seq_len=args.reserved, last_keep_len=args.last_keep)
    settings = StreamSettings(max_new_tokens=args.reply_tokens, min_new_tokens=args.reply_tokens, optimized=True,
                              vision_batch_size=args.vision_batch, reference_scores=True, speak_probe=True)
    runs, replies = {}, {}
    for name, batch in (("one_by_one", 1), ("batched", min(args.conversation_batch, len(conversations)))):
        seconds, replies[name] = stream_in_batches(model, strategy, settings, conversations, batch)
        runs[name] = {"conversation_batch": batch, "seconds": seconds, "frames_per_s": frames / seconds,
                      "peak_memory_mb": peak_memory_mb(model.device)}
        log.info("%s (batch %d): %.1f s, %.1f frames/s", name, batch, seconds, frames / seconds)
    same = total = 0
    for conversation_id, reference in replies["one_by_one"].items():
        for index, text in reference.items():
            total += 1
            same += replies["batched"][conversation_id].get(index) == text
    header = report_header(args, model, conversations[-1])
    header["video"] = {"conversations": len(conversations), "frames": frames,
                       "frames_each": [c.num_frames for c in conversations], "reply_tokens": args.reply_tokens}
    return {**header, "strategy": f"drop_middle {args.max_seq_len}/{args.reserved}/{args.last_keep}", **runs,
            "ratio": runs["batched"]["frames_per_s"] / runs["one_by_one"]["frames_per_s"],
            "reply_agreement": same / total if total else 1.0, "replies_compared": total}


def format_dataset(report: dict) -> str:
    video = report["video"]
    lines = [f"{report['model']} ({report['dtype']}) on {report['device']}, torch {report['torch']}, transformers "
             f"{report['transformers']}, {report['date']}",
             f"dataset: {video['conversations']} conversations of {min(video['frames_each'])}-{max(video['frames_each'])} frames "
             f"({video['frames']} in all), replies of {video['reply_tokens']} tokens; {report['strategy']}"]
    for name in ("one_by_one", "batched"):
        run = report[name]
        lines.append(f"conversation_batch {run['conversation_batch']:>3}: {run['seconds']:8.1f} s  {run['frames_per_s']:8.1f} frames/s  "
                     f"peak {run['peak_memory_mb']:.0f} MB")
    lines.append(f"batched / one by one: {report['ratio']:.2f}x frames per second; {report['reply_agreement']:.1%} of "
                 f"{report['replies_compared']} greedy replies identical")
    return "\n".join(lines)
