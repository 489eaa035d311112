"""results.json: the run's status, flat metrics, per-conversation metrics, resolved config, environment
and job key. Written even when the run fails (status "failed" with the error)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from prospect.stream.frame_record import FrameRecord
from prospect.context_strategies.events import REDUCTION_EVENTS

RESULTS_SCHEMA = "prospect.results/1"
# Part of every job key: bump it when a change alters what a run computes (stream, strategies, metrics),
# so the result cache never reuses numbers made by the older code.
PROTOCOL_VERSION = 6  # 2: token provenance (cache_frame_share); 3: proassist_exact in ProAssist's float32 arithmetic;
# 4: teacher-forced reference scores and P(speak) per frame in the trace and predictions; 5: snapkv/key_norm select
# per (layer, head) by default, the orphan rule is a fixpoint, budget strategies protect the system prompt;
# 6: frame text inside a score strategy's protected window is kept (the orphan rule applies before the window)


# Part of the job key of sampled runs (stream.temperature > 0) only; 2: a Gumbel-max draw from a device generator
# seeded per decode (prospect/models/sampling.py), where 1 drew from one CPU generator per conversation.
SAMPLING_VERSION = 2


def stream_metrics(traces: list[list[FrameRecord]], peak_memory_mb: float, kv_bytes_per_token: int = 0) -> dict[str, float]:
    """Stream figures over all fed frames (the seed's names where it had them): counts, cache tokens, seconds
    per frame, ms per decoded token. Those that outputs list are declared in prospect.eval.per_run_metrics.

    peak_memory_mb is the allocator's peak (CUDA max allocated; on CPU the process's peak RSS, model
    loading included); the KV buffer is preallocated to the strategy's capacity, so it barely differs
    between strategies. kv_cache_peak_mb = max_cache_size x the model's KV bytes per token is the cache
    memory the strategy actually needs, the figure to compare strategies by. cache_frame_share is the mean,
    over fed frames, of the fraction of the cache held by frame tokens (image + frame_text) after the step (on
a per-head cache, averaged over layers and KV heads); cache_frame_share_spread is the mean, over the same
frames, of (most - fewest frame tokens of any layer and KV head) / cache tokens: 0 while all heads hold the
same tokens."""
    records = [record for trace in traces for record in trace]
    seconds = np.array([r["wall_ms"] / 1000 for r in records]) if records else np.zeros(0)
    tokens = sum(r.get("generated_tokens", 0) for r in records)
    decode_ms = sum(r.get("decode_ms", 0.0) for r in records)
    shares = [r["cache_frame_tokens"] / r["cache_after"] for r in records if r.get("cache_after") and "cache_frame_tokens" in r]
    spreads = [
        (r["cache_frame_tokens_range"][1] - r["cache_frame_tokens_range"][0]) / r["cache_after"] if "cache_frame_tokens_range" in r else 0.0
        for r in records if r.get("cache_after") and "cache_frame_tokens" in r
    ]
    return {
        "frames_processed": len(records),
        "dialogues_generated": sum("speak" in r["events"] for r in records),
        "tokens_generated": tokens,
        "cache_compressions": sum(e in REDUCTION_EVENTS for r in records for e in r["events"]),
        "avg_cache_size": float(np.mean([r["cache_after"] for r in records])) if records else 0.0,
        "max_cache_size": max((r.get("cache_max", r["cache_after"]) for r in records), default=0),
        "kv_cache_peak_mb": max((r.get("cache_max", r["cache_after"]) for r in records), default=0) * kv_bytes_per_token / 2**20,
        "cache_frame_share": float(np.mean(shares)) if shares else 0.0,
        "cache_frame_share_spread": float(np.mean(spreads)) if spreads else 0.0,
        "time_per_frame": float(seconds.mean()) if records else 0.0,
        "time_per_frame_p95": float(np.percentile(seconds, 95)) if records else 0.0,
        "decode_ms_per_token": decode_ms / tokens if tokens else 0.0,
        "peak_memory_mb": float(peak_memory_mb),
    }


def _strategy_part(strategy: dict) -> dict:
    """Only the parameters the strategy class uses (strategies that ignore last_keep_len share a key)."""
    from prospect.context_strategies import strategy_parameters  # lazy: the strategy registry loads torch

    target = strategy.get("_target_")
    try:
        module_name, _, class_name = str(target).rpartition(".")
        accepted = strategy_parameters(getattr(importlib.import_module(module_name), class_name))
    except (ImportError, AttributeError, ValueError):
        accepted = None
    used = {k: v for k, v in strategy.items() if k != "name" and (accepted is None or k in accepted or k == "_target_")}
    return used


def batches_conversations(config: Any) -> bool:
    """Whether a job streams several conversations at once (an integer stream.conversation_batch > 1, and a model:
    the oracle streams nothing): it then runs the optimized step, whatever `stream.optimized: auto` means here."""
    batch = config["stream"].get("conversation_batch", "auto")
    return isinstance(batch, int) and not isinstance(batch, bool) and batch > 1 and not config["model"].get("oracle")


def resolved_execution(model: dict, stream: dict) -> dict:
    """What "auto" settles to on this machine: device type, dtype, optimized path, and `compile: true` where the
    optimized step is compiled (left out otherwise, so the keys of uncompiled runs stay as they were)."""
    import torch  # lazy: the launchers and summaries import this module and load no torch

    device = str(model.get("device", "auto"))
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device.split(":")[0]
    dtype = str(model.get("dtype", "auto"))
    optimized = stream.get("optimized", "auto")
    compile = stream.get("compile", "auto")
    execution = {
        "device": kind,
        "dtype": ("bfloat16" if kind == "cuda" else "float32") if dtype == "auto" else dtype,
        "optimized": (kind == "cuda" or batches_conversations({"model": model, "stream": stream})) if optimized == "auto" else bool(optimized),
    }
    if execution["optimized"] and ((kind == "cuda") if compile == "auto" else bool(compile)):
        execution["compile"] = True
    return execution


def job_key(config: dict) -> str:
    """A stable hash of what determines a run's results: model, strategy (used parameters), dataset
    (without its root folder), eval, stream settings, seed, what "auto" resolves to here (device type,
    dtype, optimized path, compile) and PROTOCOL_VERSION; not the logger or paths."""
    dataset = {k: v for k, v in config["dataset"].items() if k != "root"}
    model = {k: v for k, v in config["model"].items() if k not in ("device", "dtype")}  # hashed as resolved
    stream = {k: v for k, v in config["stream"].items() if k not in ("optimized", "compile", "vision_batch_size", "conversation_batch")}
    relevant = {
        "protocol": PROTOCOL_VERSION,
        "execution": resolved_execution(config["model"], config["stream"]),
        "model": model,
        "strategy": _strategy_part(config["strategy"]),
        "dataset": dataset,
        "eval": config["eval"],
        "stream": stream,
        "seed": config["seed"],
    }
    if float(config["stream"].get("temperature", 0.0)) > 0:  # sampled runs only: greedy keys stay as they were
        relevant["sampling"] = SAMPLING_VERSION
    text = json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _git(args: list[str]) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: str | None = None) -> dict[str, Any]:
    """Where the numbers came from: code version, libraries and device."""
    import torch  # lazy, with the next: the launchers and summaries import this module and load no torch
    import transformers

    commit = _git(["rev-parse", "HEAD"])
    status = _git(["status", "--porcelain", "--untracked-files=no"])
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "device_name": device_name,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "hostname": platform.node(),
    }


def results_document(
    status: str,
    error: str | None,
    metrics: dict,
    per_conversation: dict,
    config: dict,
    env: dict,
    key: str,
    extra: dict | None = None,
) -> dict:
    return {
        "schema": RESULTS_SCHEMA,
        "status": status,
        "error": error,
        "job_key": key,
        "metrics": metrics,
        "per_conversation": per_conversation,
        "config": config,
        "env": env,
        **(extra or {}),
    }
