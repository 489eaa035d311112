"""Decoding: choosing the next token (greedy, or temperature / top-p sampling with a seeded generator) and
decoding the replies (or summaries) of several lanes together."""

from __future__ import annotations

import time
from typing import Sequence

import torch

from prospect.cache import KIND, cache_length
from prospect.models.sampling import sample_tokens
from prospect.stream.feed import Lane, forward_lanes


def suppression_bias(vocab: int, suppressed: Sequence[int], device: torch.device) -> torch.Tensor:
    """An additive bias [vocab]: -inf on the suppressed ids, 0 elsewhere (built once, reused every step)."""
    bias = torch.zeros(vocab, device=device)
    if suppressed:
        bias[list(suppressed)] = float("-inf")
    return bias


def decode_seed(seed: int, decode: int) -> int:
    """The sampling seed of a lane's `decode`-th decode (reply or summary) of a conversation under `seed`: each
    decode draws from its own stream, so what a lane samples does not depend on how many draws its earlier
    decodes made (a lane batched with others draws past its own stop; alone it would not)."""
    return (int(seed) * 1_000_003 + int(decode)) % 2**63


def pick_token(
    logits: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """The next token id from float logits [vocab] plus an optional suppression `bias`; temperature 0 = greedy,
    else sample_tokens with uniform noise drawn from `generator` (on the logits' device)."""
    if bias is not None:
        logits = logits + bias
    if temperature <= 0:
        return int(torch.argmax(logits))
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    return int(sample_tokens(logits[None], temperature, top_p, uniform[None])[0])


def decode_lanes(
    lanes: list[Lane], logits: torch.Tensor, max_new_tokens: int | Sequence[int], timing_key: str = "decode_ms",
    kind: int = KIND["assistant"],
) -> list[list[int]]:
    """Decode each lane's reply from its prompt logits (`logits[i]`) until its end of turn or max_new_tokens
    (one for all, or one per lane: summaries are bounded by each lane's room), the lanes still speaking as one step; each reply and its closing tokens stay in its lane's cache. The
    end-of-turn token is excluded for the first min_new_tokens steps. Lanes on one StaticForward with one
    temperature and top_p choose their tokens on the device (StaticForward.decode_on_device: one host read per
    chain of steps); the eager path chooses them on the host, one read per token. Sampling draws from each
    lane's generator on the model's device, seeded per decode (decode_seed), so both ways choose alike.

    Timing: `timing_key` (decode_ms for replies, summary_ms for summaries) covers choosing every token and
    feeding all but the last; the last token is fed with the closing tokens (counted in prefill_ms)."""
    t0 = time.perf_counter()
    limits = [max_new_tokens] * len(lanes) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    for lane in lanes:
        lane._decodes += 1
        if lane.settings.temperature > 0:
            lane._generator.manual_seed(decode_seed(lane.settings.seed, lane._decodes))
    first = lanes[0].settings
    choice = (first.temperature, first.top_p, first.min_new_tokens)
    static = lanes[0].static
    if static is not None and all(lane.static is static and lane.on_forward is None for lane in lanes) and all(
        (lane.settings.temperature, lane.settings.top_p, lane.settings.min_new_tokens) == choice for lane in lanes
    ):  # the token choice and the stop check stay on the device (StaticForward.decode_on_device)
        sampling = (first.temperature, first.top_p, [lane._generator for lane in lanes]) if first.temperature > 0 else None
        replies = static.decode_on_device([lane.cache for lane in lanes], list(logits), [(lane._bias_early, lane._bias_late) for lane in lanes],
                                          first.min_new_tokens, limits, kind, sampling)
        tokens = {id(lane): reply for lane, (reply, _) in zip(lanes, replies)}
        stopped = {id(lane): stop for lane, (_, stop) in zip(lanes, replies)}
        for lane in lanes:
            lane._cache_max = max(lane._cache_max, cache_length(lane.cache))
    else:
        tokens, stopped = _choose_on_host(lanes, logits, limits, kind)
    elapsed = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    closings: dict[int, list[Lane]] = {}
    for lane in lanes:
        lane._timing[timing_key] = lane._timing.get(timing_key, 0.0) + elapsed
        reply = tokens[id(lane)]
        tail = [] if stopped[id(lane)] or not reply else [reply[-1]]
        closings.setdefault(len(tail), []).append(lane)
    for tail_len, group in closings.items():
        forward_lanes(group, [tokens[id(lane)][-1:][:tail_len] + lane.closing_ids for lane in group], kind=kind)
    elapsed = (time.perf_counter() - t0) * 1000
    for lane in lanes:
        lane._timing["prefill_ms"] += elapsed
    return [tokens[id(lane)] for lane in lanes]


def _choose_on_host(lanes: list[Lane], logits: torch.Tensor, limits: list[int], kind: int) -> tuple[dict, dict]:
    """decode_lanes' token choice, one host read per token and lane (sampling, or lanes without a shared
    StaticForward), lane i choosing at most `limits[i]` tokens (the last one not fed): ({id(lane): reply},
    {id(lane): whether a stop id ended it})."""
    tokens: dict[int, list[int]] = {id(lane): [] for lane in lanes}
    stopped: dict[int, bool] = {id(lane): False for lane in lanes}
    limit = {id(lane): n for lane, n in zip(lanes, limits)}
    active = [lane for lane in lanes if limit[id(lane)] >= 1]
    rows = [row for lane, row in zip(lanes, logits) if limit[id(lane)] >= 1]
    for step in range(max(limits, default=0)):
        going = []
        for lane, row in zip(active, rows):
            settings = lane.settings
            bias = lane._bias_early if step < settings.min_new_tokens else lane._bias_late
            token = pick_token(row, bias, settings.temperature, settings.top_p, lane._generator)
            if token in lane.model.stop_ids:
                stopped[id(lane)] = True
                continue
            tokens[id(lane)].append(token)
            if step < limit[id(lane)] - 1:
                going.append(lane)
        if not going:
            break
        rows = forward_lanes(going, [[tokens[id(lane)][-1]] for lane in going], kind=kind)
        active = going
    return tokens, stopped
