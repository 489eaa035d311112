"""Choosing the next token: greedy, or temperature / top-p sampling with a seeded generator."""

from __future__ import annotations

from typing import Sequence

import torch


def suppression_bias(vocab: int, suppressed: Sequence[int], device: torch.device) -> torch.Tensor:
    """An additive bias [vocab]: -inf on the suppressed ids, 0 elsewhere (built once, reused every step)."""
    bias = torch.zeros(vocab, device=device)
    if suppressed:
        bias[list(suppressed)] = float("-inf")
    return bias


def pick_token(
    logits: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """The next token id from float logits [vocab] plus an optional suppression `bias`; temperature 0 = greedy."""
    if bias is not None:
        logits = logits + bias
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    choice = torch.multinomial(probs.cpu(), 1, generator=generator)
    return int(choice)
