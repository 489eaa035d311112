"""Talk policies: when does the assistant speak after a frame?

- gt_turns (the seed's baseline): exactly at the frames that carry a reference.
- threshold (ProAssist): prompt an assistant turn and read the probability that its first token ends
  the turn; above `talk_threshold` the assistant stays silent (the probe tokens are removed from the
  cache), otherwise it speaks (the end-of-turn token is then excluded from the first step).
"""

from __future__ import annotations

from typing import Sequence

import torch

from prospect.stream.settings import TALK_POLICIES  # noqa: F401  (named here for its readers)


def not_talk_probability(logits: torch.Tensor, stop_ids: Sequence[int]) -> float:
    """P(the reply ends at once) = softmax(logits)[end-of-turn] (summed over stop tokens)."""
    return float(torch.softmax(logits.float(), dim=-1)[list(stop_ids)].sum())
