"""How many lanes of the fused launcher (prospect.sweep.fused) run together: the memory arithmetic of a lane set.

A worker's lanes share one model and keep each its own static KV buffers, whose rows span the set's largest
capacity. `capacity_sets` keeps lanes of similar capacity together (`full`, whose buffer is the model's max
positions, apart from bounded strategies); `memory_sets` splits a set further so that weights + L x (KV rows,
query rows where a strategy keeps them, an activation margin) + a reserve fit the GPU's free memory
(`split_for_memory`, in balanced sets: `balanced_sizes`, `chunks`). What a model and a lane cost comes from
the architecture (prospect.models.footprint). Everything that needs torch is imported where it is used: the
launcher process, which imports this module, loads no torch.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

from omegaconf import OmegaConf

from prospect.models.footprint import GIB, RESERVE_BYTES, lane_bytes
from prospect.sweep.gpu_pool import PoolJob

log = logging.getLogger("prospect.sweep.fused")  # the fused worker's log lines, under its name as before this module existed

CAPACITY_RATIO = 2  # a lane set never holds lanes whose capacities differ by more than this factor (capacity_sets)


def balanced_sizes(count: int, most: int) -> list[int]:
    """`count` items in the fewest parts of at most `most`, sizes differing by at most one (largest first)."""
    if count <= 0:
        return []
    parts = math.ceil(count / max(1, most))
    return [count // parts + (1 if i < count % parts else 0) for i in range(parts)]


def chunks(items: Sequence[Any], sizes: Sequence[int]) -> list[list[Any]]:
    """`items` cut into consecutive parts of `sizes`."""
    out, start = [], 0
    for size in sizes:
        out.append(list(items[start : start + size]))
        start += size
    return out


def split_for_memory(lanes: int, free_bytes: int, weight_bytes: int, lane_bytes: int, reserve_bytes: int = RESERVE_BYTES) -> list[int]:
    """Sizes of the lane sets to run one after the other so that weights + L x lane_bytes + reserve fits
    free_bytes (balanced, as few sets as possible). When not even one lane fits, one lane per set: each then
    fails (out of memory) as the job alone would, recorded in its results.json."""
    room = free_bytes - weight_bytes - reserve_bytes
    fit = max(1, room // lane_bytes) if lane_bytes > 0 else lanes
    return balanced_sizes(lanes, int(fit))


def capacity_sets(jobs: list[PoolJob]) -> list[list[PoolJob]]:
    """`jobs` (one lane set) split so that no lane's KV buffer exceeds CAPACITY_RATIO times its own capacity:
    every lane's rows span the set's largest capacity, so `full` (the model's max positions) among bounded
    strategies would multiply their memory (and, on the CPU, their attention). Lanes of similar capacity stay
    together; each part keeps sweep order. An estimate that cannot be made leaves the set whole."""
    model_cfg = jobs[0].config["model"]
    if model_cfg.get("oracle") or len(jobs) == 1:
        return [jobs]
    try:
        from prospect.context_strategies import strategy_from_config  # lazy: torch
        from prospect.models.footprint import model_footprint  # lazy: torch, transformers

        text, _ = model_footprint(model_cfg)
        capacities = [strategy_from_config(OmegaConf.create(j.config["strategy"])).capacity(text.max_position_embeddings) for j in jobs]
    except Exception as error:  # the lanes' own run reports a real problem
        log.warning("cannot tell the lanes' capacities (%s: %s): running the %d lanes together", type(error).__name__, error, len(jobs))
        return [jobs]
    parts: list[list[int]] = []
    for index in sorted(range(len(jobs)), key=lambda i: capacities[i]):
        if not parts or capacities[index] > CAPACITY_RATIO * capacities[parts[-1][0]]:
            parts.append([])
        parts[-1].append(index)
    if len(parts) > 1:
        log.info("lanes of capacities %s run in %d sets of similar capacity", sorted(set(capacities)), len(parts))
    return [[jobs[i] for i in sorted(part)] for part in parts]


def memory_sets(jobs: list[PoolJob]) -> list[list[PoolJob]]:
    """`jobs` (one lane set) split so that each part fits the GPU's free memory; on CPU (or for the oracle)
    one part. An estimate that cannot be made (an unknown model) leaves the set whole, with a warning."""
    model_cfg = jobs[0].config["model"]
    if model_cfg.get("oracle") or len(jobs) == 1:
        return [jobs]
    try:
        import torch  # lazy, with the next three: the launcher loads no torch

        from prospect.context_strategies import strategy_from_config
        from prospect.models.footprint import model_footprint
        from prospect.models.vlm import resolve_device, resolve_dtype

        device = resolve_device(str(model_cfg.get("device", "auto")))
        if device.type != "cuda":
            return [jobs]
        dtype_bytes = resolve_dtype(str(model_cfg.get("dtype", "auto")), device).itemsize
        text, parameters = model_footprint(model_cfg)
        strategies = [strategy_from_config(OmegaConf.create(j.config["strategy"])) for j in jobs]
        capacity = max(strategy.capacity(text.max_position_embeddings) for strategy in strategies)
        lane = lane_bytes(text, dtype_bytes, capacity, any(strategy.records_queries for strategy in strategies))
        batch = jobs[0].config["stream"].get("conversation_batch", "auto")
        lane *= batch if isinstance(batch, int) else 1  # a job of N conversations at once is N lanes (auto fits itself)
        free, _ = torch.cuda.mem_get_info(device)
    except Exception as error:  # the lanes' own run reports a real problem (e.g. the model cannot be loaded)
        log.warning("cannot estimate the lanes' memory (%s: %s): running the %d lanes together", type(error).__name__, error, len(jobs))
        return [jobs]
    sizes = split_for_memory(len(jobs), free, parameters * dtype_bytes, lane)
    if len(sizes) > 1:
        log.warning("%d lanes (%.1f GiB weights + %.2f GiB per lane) do not fit the GPU's %.1f GiB free: running them as %s",
                    len(jobs), parameters * dtype_bytes / GIB, lane / GIB, free / GIB, " then ".join(map(str, sizes)))
    return chunks(jobs, sizes)
