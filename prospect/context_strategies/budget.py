"""What the zoo's strategies share (docs/strategies.md), written once: the equal-budget rule, the protected
prefix and window, text first, whole frames, no orphan frame text, and selection per (layer, head).

Equal budget: at a reduction a `BudgetKeep` strategy keeps the protected prefix (ProAssist's initial cache,
as drop_middle; before one exists, the system prompt) plus at most `last_keep_len` of the tokens after it,
so a sweep over `last_keep_len` compares *which* tokens survive at drop_middle's memory. A strategy only
says how it chooses:
- `ScoredKeep.score(cache)`: a score per cached token (higher = kept), [length] or [layers, kv_heads,
  length]. The last `window` tokens are always kept, then the best-scored candidates fill the budget.
  `selection` says who shares a keep set: `shared` (one set for every layer and head: scores averaged over
  heads, then layers), `per_layer` (one set per layer: averaged over its heads) or `per_head` (one set
  per layer and KV head, as SnapKV and KnormPress select). Every layer and head keeps the same count.
- Orphan rule (a fixpoint): a frame's frame_text token before the window is kept only with an image token
  of its frame (the window is kept as it is, frame text included). It
  competes at its own score but enters no earlier than its frame's best-ranked image token: candidates
  are taken greedily in score order, and frame text met before any image of its frame waits and enters
  right after that image (budget permitting). So no dropped frame text is passed over when its frame's
  image later gets in, and the result holds no orphan (`keep_order`).
- `TextFirstKeep.choose_frame_tokens(cache, slots, budget)`: every dialogue token after the prefix is kept
  (the newest ones if they alone exceed the budget); the strategy picks frame tokens for what is left.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prospect.cache import KIND, PositionedCache, cache_length, keep_tokens_per_head
from prospect.context_strategies.base import BaseContextStrategy, check_last_keep_len

SELECTIONS = ("shared", "per_layer", "per_head")


@dataclass
class BudgetKeep(BaseContextStrategy):
    """Keeps the protected prefix plus at most `last_keep_len` chosen tokens after it (see module doc)."""

    last_keep_len: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        check_last_keep_len(self)

    def prefix_len(self) -> int:
        """Tokens at the start of the cache that are always kept: ProAssist's initial cache, or the system
        prompt before one exists (so the system prompt never competes with frames for the budget)."""
        return self.init_len if self.init_kv_cache is not None else self.prompt_len

    @abstractmethod
    def choose(self, cache: PositionedCache, candidates: torch.Tensor, budget: int) -> torch.Tensor:
        """Slots to keep among `candidates` (ascending slots after the prefix), at most `budget` of them:
        [count], or [layers, kv_heads, count] for a choice per (layer, head)."""

    def handle_overflow(self, past_key_values: Any, last_msg, **context: Any):
        length = cache_length(past_key_values)
        prefix = min(self.prefix_len(), length)
        candidates = torch.arange(prefix, length)
        chosen = candidates if len(candidates) <= self.last_keep_len else self.choose(past_key_values, candidates, self.last_keep_len)
        if chosen.shape[-1] > self.last_keep_len:
            raise RuntimeError(f"{self.name} chose {chosen.shape[-1]} tokens for a budget of {self.last_keep_len}")
        chosen = torch.sort(chosen.long(), dim=-1).values
        if chosen.dim() == 1:
            self.keep_index(past_key_values, torch.cat([torch.arange(prefix), chosen]))
        else:
            kept = torch.cat([torch.arange(prefix).expand(*chosen.shape[:2], prefix), chosen], dim=-1)
            keep_tokens_per_head(past_key_values, kept)
            self._apply_position_mode(past_key_values)
        return past_key_values, last_msg


def keep_order(
    scores: torch.Tensor, kinds: torch.Tensor, frames: torch.Tensor, window: int, drop_orphans: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The order in which candidates enter the keep set, per group (layer, head or both): [groups, m]
    candidate indices, eligible ones first; returns (order, eligible count per group).

    scores, kinds, frames: [groups, m] over the candidates (ascending slots). The last `window` candidates
    come first (slot order), then the others by descending score (ties: the older slot). With
    `drop_orphans`, a frame_text token before the window enters no earlier than its frame's first image
    token (right after it, in its own rank order) and never without one (see the module docstring); the
    window's tokens are kept whatever they are."""
    groups, count = scores.shape
    key = -scores.double()
    key[:, count - window :] = float("-inf")
    rank = torch.empty_like(kinds, dtype=torch.long)
    positions = torch.arange(count, device=kinds.device).expand(groups, count).contiguous()
    rank.scatter_(1, torch.sort(key, dim=1, stable=True).indices, positions)
    if not drop_orphans:
        return torch.argsort(rank, dim=1), torch.full((groups,), count)
    image = kinds == KIND["image"]
    text = (kinds == KIND["frame_text"]) & (positions < count - window)  # the window is kept whole
    frame_ids, frame_of = torch.unique(frames, return_inverse=True)
    never = 2 * count  # a rank no token has: "no image of this frame"
    first_image = torch.full((groups, len(frame_ids)), never, dtype=torch.long, device=kinds.device)
    first_image.scatter_reduce_(1, frame_of, torch.where(image, rank, never), reduce="amin")
    entry = torch.where(text, torch.maximum(rank, torch.gather(first_image, 1, frame_of)), rank)
    eligible = entry < never
    order_key = torch.where(eligible, entry * (2 * count) + text.long() * count + rank, never * (2 * count) * 2)
    return torch.sort(order_key, dim=1, stable=True).indices, eligible.sum(dim=1)


@dataclass
class ScoredKeep(BudgetKeep):
    """Keeps the last `protected_window` candidates, then the best-scored ones (kvpress's ScorerPress), one
    keep set per `selection` group (see the module docstring; `HeadScoredKeep` makes it a parameter)."""

    drop_orphans: ClassVar[bool] = True  # frame_text stays only with an image token of its frame
    selection: ClassVar[str] = "shared"

    @property
    def protected_window(self) -> int:
        return int(getattr(self, "window", 0))

    @abstractmethod
    def score(self, cache: PositionedCache) -> torch.Tensor:
        """Scores of the cached tokens, higher kept first: [length], or [layers, kv_heads, length] (any device)."""

    def grouped_scores(self, cache: PositionedCache) -> torch.Tensor:
        """The scores per `selection` group, where they were computed: [1, 1, length] (shared), [layers, 1,
        length] (per_layer) or [layers, kv_heads, length] (per_head)."""
        scores = self.score(cache).float()
        if scores.dim() == 1:
            if self.selection != "shared":
                raise TypeError(f"{self.name}: selection={self.selection} needs scores per (layer, head)")
            return scores[None, None]
        return self.group_mean(scores)

    def group_mean(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores [layers, kv_heads, length] averaged within each `selection` group: over heads (per_layer),
        over heads then layers (shared); a dimension already of size 1 stays."""
        if self.selection == "per_head":
            return scores
        scores = scores.mean(dim=1, keepdim=True)
        return scores if self.selection == "per_layer" else scores.mean(dim=0, keepdim=True)

    def choose(self, cache: PositionedCache, candidates: torch.Tensor, budget: int) -> torch.Tensor:
        scores = self.grouped_scores(cache)
        if scores.shape[:2] == (1, 1) and not cache.per_head:
            records = cache.records
            kinds, frames = records.kinds[None, None], records.frames[None, None]
        else:  # one keep set per (layer, KV head); a per_layer set serves all heads of its layer
            records = cache.head_records()
            kinds, frames = records.kinds, records.frames
            scores = scores.expand_as(kinds)
        layers, heads = scores.shape[:2]
        window = min(self.protected_window, budget, len(candidates))
        at = candidates.to(scores.device)  # ranked where the scores are (the GPU on the 2.2B: 768 keep sets)

        def flat(values: torch.Tensor) -> torch.Tensor:
            return values.to(scores.device)[..., at].reshape(layers * heads, len(candidates))

        order, eligible = keep_order(flat(scores), flat(kinds), flat(frames), window, self.drop_orphans)
        count = min(budget, int(eligible.min()))
        chosen = candidates[order[:, :count].cpu()].reshape(layers, heads, count)
        return chosen[0, 0] if (layers, heads) == (1, 1) else chosen


@dataclass
class HeadScoredKeep(ScoredKeep):
    """A ScoredKeep whose scores come per (layer, KV head) and whose `selection` is a parameter
    (shared, per_layer or per_head; see the module docstring)."""

    selection: str = "per_head"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection}: choose one of: {', '.join(SELECTIONS)}")


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


def per_layer_heads(cache: PositionedCache, per_layer) -> torch.Tensor:
    """`per_layer(keys, values)` ([kv_heads, length] each; keys/values [1, kv_heads, length, dim]) stacked
    over layers: [layers, kv_heads, length], float."""
    return torch.stack([per_layer(keys, values).float() for keys, values in cache.layer_tensors()])


def mean_over_layers(cache: PositionedCache, per_layer) -> torch.Tensor:
    """The mean over layers of `per_layer(keys, values)` ([length] each; keys/values [1, heads, length, dim])."""
    total, layers = None, 0
    for keys, values in cache.layer_tensors():
        value = per_layer(keys, values).float()
        total = value if total is None else total + value
        layers += 1
    return total / layers
