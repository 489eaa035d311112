"""Choosing tokens from logits on their device: the sampling draw shared by the device decode
(prospect/models/static_forward.py) and the stream's host loop (prospect/stream/decode.py)."""

from __future__ import annotations

import torch


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """Sampled token ids [rows] from float logits [rows, vocab] (suppression bias already added): temperature,
    then top-p (the smallest set of tokens whose probabilities reach top_p), then the Gumbel-max draw with the
    given uniform noise [rows, vocab] in (0, 1): argmax(logits / T - log(-log u)) is a draw from the softmax
    (https://en.wikipedia.org/wiki/Gumbel_distribution#Gumbel_reparametrization_tricks). Row-wise, all on the
    logits' device, without a host read: the device decode and the host loop choose alike from the same noise."""
    scaled = logits.float() / temperature
    if top_p < 1.0:
        probs = torch.softmax(scaled, dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        scaled = scaled.masked_fill(torch.zeros_like(outside).scatter_(-1, order, outside), float("-inf"))
    gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(torch.float32).tiny, max=1.0 - 2**-24)))
    return torch.argmax(scaled + gumbel, dim=-1)
