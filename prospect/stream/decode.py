"""Choosing the next token: greedy, or temperature / top-p sampling with a seeded generator."""

from __future__ import annotations

from typing import Sequence

import torch


def pick_token(
    logits: torch.Tensor,
    suppressed: Sequence[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """The next token id from float logits [vocab]; `suppressed` ids are never chosen; temperature 0 = greedy."""
    if suppressed:
        logits = logits.clone()
        logits[list(suppressed)] = float("-inf")
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    choice = torch.multinomial(probs.cpu(), 1, generator=generator)
    return int(choice)
