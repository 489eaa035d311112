"""What the zoo's strategies share (docs/strategies.md), written once: the equal-budget rule, the protected
prefix and window, text first, whole frames, and no orphan frame text.

Equal budget: at a reduction a `BudgetKeep` strategy keeps the protected prefix (the initial cache, as
drop_middle; empty before one exists) plus at most `last_keep_len` of the tokens after it, so a sweep over
`last_keep_len` compares *which* tokens survive at drop_middle's memory. One keep set serves every layer
and head (slots and positions are shared across layers). A strategy only says how it chooses:
- `ScoredKeep.score(cache)`: a score per cached token (higher = kept); the last `window` tokens are always
  kept, then the best-scored candidates fill the budget. A frame's frame_text tokens are kept only while
  one of its image tokens is: orphans are dropped (in the window too) and the budget refilled with the
  next best tokens.
- `TextFirstKeep.choose_frame_tokens(cache, slots, budget)`: every dialogue token after the prefix is kept
  (the newest ones if they alone exceed the budget); the strategy picks frame tokens for what is left.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prospect.cache import KIND, PositionedCache, cache_length
from prospect.context_strategies.base import BaseContextStrategy, check_last_keep_len


@dataclass
class BudgetKeep(BaseContextStrategy):
    """Keeps the protected prefix plus at most `last_keep_len` chosen tokens after it (see module doc)."""

    last_keep_len: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        check_last_keep_len(self)

    def prefix_len(self) -> int:
        """Tokens at the start of the cache that are always kept: ProAssist's initial cache."""
        return self.init_len if self.init_kv_cache is not None else 0

    @abstractmethod
    def choose(self, cache: PositionedCache, candidates: torch.Tensor, budget: int) -> torch.Tensor:
        """Slots to keep among `candidates` (ascending slots after the prefix), at most `budget` of them."""

    def handle_overflow(self, past_key_values: Any, last_msg, **context: Any):
        length = cache_length(past_key_values)
        prefix = min(self.prefix_len(), length)
        candidates = torch.arange(prefix, length)
        chosen = candidates if len(candidates) <= self.last_keep_len else self.choose(past_key_values, candidates, self.last_keep_len)
        if len(chosen) > self.last_keep_len:
            raise RuntimeError(f"{self.name} chose {len(chosen)} tokens for a budget of {self.last_keep_len}")
        self.keep_index(past_key_values, torch.cat([torch.arange(prefix), torch.sort(chosen.long()).values]))
        return past_key_values, last_msg


def orphan_frame_text(cache: PositionedCache, chosen: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Mask over `chosen`: frame_text tokens whose frame has no image token among `kept`."""
    image = kept[cache.kinds[kept] == KIND["image"]]
    frames_with_image = torch.unique(cache.frames[image])
    return (cache.kinds[chosen] == KIND["frame_text"]) & ~torch.isin(cache.frames[chosen], frames_with_image)


@dataclass
class ScoredKeep(BudgetKeep):
    """Keeps the last `protected_window` candidates, then the best-scored ones (kvpress's ScorerPress)."""

    drop_orphans: ClassVar[bool] = True  # frame_text stays only with an image token of its frame

    @property
    def protected_window(self) -> int:
        return int(getattr(self, "window", 0))

    @abstractmethod
    def score(self, cache: PositionedCache) -> torch.Tensor:
        """One score per cached token ([length], any device); higher is kept first."""

    def choose(self, cache: PositionedCache, candidates: torch.Tensor, budget: int) -> torch.Tensor:
        window = min(self.protected_window, budget, len(candidates))
        fixed, pool = candidates[len(candidates) - window :], candidates[: len(candidates) - window]
        scores = self.score(cache).float().cpu()[pool]
        ranked = pool[torch.sort(-scores, stable=True).indices]
        excluded = torch.zeros(len(ranked), dtype=torch.bool)
        while True:
            chosen = ranked[~excluded][: budget - len(fixed)]
            kept = torch.cat([chosen, fixed])
            if not self.drop_orphans:
                return kept
            orphans = orphan_frame_text(cache, kept, kept)
            if not bool(orphans.any()):
                return kept
            fixed = fixed[~orphans[len(chosen) :]]  # frame text in the window goes too; its budget is refilled
            excluded |= torch.isin(ranked, kept[orphans])


def frame_groups(cache: PositionedCache, slots: torch.Tensor) -> list[torch.Tensor]:
    """The frame tokens among `slots` grouped by frame, oldest frame first; a group without an image token
    (orphan frame text) is left out."""
    frames = cache.frames[slots]
    groups = []
    for frame in torch.unique(frames).tolist():
        group = slots[frames == frame]
        if bool((cache.kinds[group] == KIND["image"]).any()):
            groups.append(group)
    return sorted(groups, key=lambda group: int(group[0]))


@dataclass
class TextFirstKeep(BudgetKeep):
    """Keeps all dialogue tokens after the prefix (the newest if they alone exceed the budget), then the
    frame tokens the strategy picks for the rest of the budget."""

    def choose(self, cache: PositionedCache, candidates: torch.Tensor, budget: int) -> torch.Tensor:
        frame = cache.frame_mask()[candidates]
        dialogue = candidates[~frame]
        if len(dialogue) >= budget:
            return dialogue[len(dialogue) - budget :]
        picked = self.choose_frame_tokens(cache, candidates[frame], budget - len(dialogue))
        return torch.cat([dialogue, picked.long()])

    @abstractmethod
    def choose_frame_tokens(self, cache: PositionedCache, slots: torch.Tensor, budget: int) -> torch.Tensor:
        """Frame tokens to keep among `slots` (ascending), at most `budget`; no orphan frame text."""


def mean_over_layers(cache: PositionedCache, per_layer) -> torch.Tensor:
    """The mean over layers of `per_layer(keys, values)` ([length] each; keys/values [1, heads, length, dim])."""
    total, layers = None, 0
    for keys, values in cache.layer_tensors():
        value = per_layer(keys, values).float()
        total = value if total is None else total + value
        layers += 1
    return total / layers
