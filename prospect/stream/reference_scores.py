"""Teacher-forced scores of a reference reply (VideoLLM-online's LM-PPL and LM-Correctness, per turn).

The logits the stream computes at each of the reference's tokens, given the cache and the tokens before
it, score that token: its negative log-likelihood under the model's distribution, and whether it is the
model's most likely token. The runner (prospect.stream.runner.score_references) produces the logits
without changing the stream; here are only the arithmetic on them.
"""

from __future__ import annotations

from typing import Sequence

import torch


def token_scores(logits: torch.Tensor, targets: Sequence[int]) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, count of targets that are the argmax) of `targets` under
    `logits` [n, vocab] (row i predicts targets[i]): log-softmax in float32 as the model's logits come, the sum
    in float64. One host read."""
    logits = logits.float()
    index = torch.tensor(list(targets), device=logits.device)
    log_probs = torch.log_softmax(logits, dim=-1).gather(1, index[:, None])[:, 0].double()
    hits = (logits.argmax(dim=-1) == index).sum()
    nll, hits = torch.stack([-log_probs.sum(), hits.to(log_probs.dtype)]).tolist()
    return float(nll), int(hits)
