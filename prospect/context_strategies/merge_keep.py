"""What the merging strategies (`frame_merge`, `streammem`) share: BudgetKeep's equal budget, where a kept token
may be the merge of several (prospect.cache.merge_tokens; its `merged` record says how many original tokens it
stands for), and text first.

At a reduction the protected prefix stays; of the tokens after it, every dialogue token is kept (the newest
`last_keep_len` if they alone exceed the budget, and then no frame token, as TextFirstKeep), and the strategy
turns the frame tokens into at most the rest of the budget: groups of slots, each becoming one token. A
strategy keeps one set for the whole cache (`rows` 1) or one per layer (`rows` = layers; every KV head of a
layer holds the same tokens); every row ends with the same count, so the buffers stay rectangular.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from prospect.cache import FRAME_KINDS, PositionedCache, Records, cache_length, merge_tokens, merge_tokens_per_head, pad_groups
from prospect.context_strategies.budget import BudgetKeep

Groups = tuple[torch.Tensor, torch.Tensor]  # groups of slots [count, width] (each ascending, -1 after its members), weights


@dataclass
class MergeKeep(BudgetKeep):
    """A BudgetKeep whose reductions may fold frame tokens together (see the module docstring); a strategy
    defines `merge_frames` and, for one set per layer, `per_layer`."""

    def per_layer(self) -> bool:
        """True: one keep set per layer (the KV heads of a layer agree); False: one for the whole cache."""
        return False

    def choose(self, cache: PositionedCache, candidates: torch.Tensor, budget: int) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} merges tokens: its reductions plan groups (merge_frames), not kept slots")

    @abstractmethod
    def merge_frames(self, cache: PositionedCache, rows: Records, slots: list[torch.Tensor], room: int, context: dict[str, Any]) -> list[Groups]:
        """For each row r, what the frame tokens at `slots[r]` (ascending) become: groups of slots and their members'
        weights (padded, as prospect.cache.pad_groups), at most `room` groups, the same count in every row.
        `rows`: the records [rows, length]."""

    def handle_overflow(self, past_key_values: Any, last_msg, **context: Any):
        cache = past_key_values
        length = cache_length(cache)
        prefix = min(self.prefix_len(), length)
        if length - prefix <= self.last_keep_len:
            self._apply_position_mode(cache)
            return cache, last_msg
        rows = self.rows(cache)
        frame = (rows.kinds[:, prefix:] == FRAME_KINDS[0]) | (rows.kinds[:, prefix:] == FRAME_KINDS[1])
        dialogue = [prefix + torch.nonzero(~row).flatten() for row in frame]
        if len({len(d) for d in dialogue}) != 1:
            raise RuntimeError(f"{self.name}: the rows of the cache hold different dialogue tokens")
        budget = self.last_keep_len
        if len(dialogue[0]) >= budget:  # text first: the newest dialogue tokens, no frame token
            planned: list[Groups] = [pad_groups([]) for _ in dialogue]
            dialogue = [d[len(d) - budget :] for d in dialogue]
        else:
            planned = self.merge_frames(cache, rows, [prefix + torch.nonzero(row).flatten() for row in frame], budget - len(dialogue[0]), context)
        rows_groups = [_with_singles(torch.cat([torch.arange(prefix), kept]), groups) for groups, kept in zip(planned, dialogue)]
        if len({members.shape[0] for members, _ in rows_groups}) != 1:
            raise RuntimeError(f"{self.name}: the rows of the cache would keep different counts")
        if not self.per_layer():
            merge_tokens(cache, *rows_groups[0])
        else:
            width = max(members.shape[1] for members, _ in rows_groups)
            members = torch.stack([_widen(m, width, -1) for m, _ in rows_groups])
            weights = torch.stack([_widen(w, width, 0) for _, w in rows_groups])
            merge_tokens_per_head(cache, members[:, None], weights[:, None])  # [layers, 1, ...]: every head of a layer alike
        self._apply_position_mode(cache)
        return cache, last_msg

    def rows(self, cache: PositionedCache) -> Records:
        """The records of each row, [rows, length]: one row for the whole cache, or one per layer (its first KV
        head's; the heads of a layer must agree, as this strategy's own reductions leave them)."""
        if not self.per_layer():
            return Records(*(t[None] for t in cache.records))
        records = cache.head_records()
        if cache.per_head and not all(bool((t == t[:, :1]).all()) for t in records):  # positions alone may agree (contiguous)
            raise RuntimeError(f"{self.name} keeps one set per layer, but the KV heads of a layer hold different tokens")
        return Records(*(t[:, 0] for t in records))



def _widen(padded: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    return torch.nn.functional.pad(padded, (0, width - padded.shape[1]), value=fill)


def _with_singles(singles: torch.Tensor, groups: Groups) -> Groups:
    """The groups of one row with a single-token group for each slot of `singles`, all listed by first slot."""
    members, weights = groups
    width = max(members.shape[1], 1)
    every = torch.cat([_widen(singles[:, None], width, -1), _widen(members, width, -1)])
    every_weights = torch.cat([_widen(torch.ones(len(singles), 1, dtype=torch.float64), width, 0), _widen(weights, width, 0)])
    order = torch.argsort(every[:, 0])
    return every[order], every_weights[order]
