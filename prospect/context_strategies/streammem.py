from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prospect.cache import KIND, PositionedCache, Records, cache_length, pad_groups
from prospect.context_strategies.budget import keep_order
from prospect.context_strategies.merge_keep import Groups, MergeKeep
from prospect.context_strategies.snapkv import window_attention

SELECTIONS = ("per_layer", "shared")


@dataclass
class StreamMem(MergeKeep):
    """`streammem` (StreamMem, Yang et al. 2025, arXiv 2508.15717): query-agnostic. Over the threshold, keep the
    initial cache and every dialogue token after it (the newest if they alone exceed `last_keep_len`); score
    every frame token by the attention it receives from the chat template's assistant prompt, fed on top of
    the cache and removed again (the runner's `probe`): softmax(q k^T / sqrt(d)) of the prompt's queries,
    summed over them, averaged over the heads of a layer. In each layer, keep the best-scored frame tokens
    (frame text only with an image token of its frame kept, as the score-based strategies) and fold the
    evicted image tokens of each frame, when they are two or more, into one prototype token: their keys and
    values weighted by their normalised scores (RoPE undone for the average; the prototype sits at the
    frame's first evicted token's position, with the frame's label and `merged` = the tokens it stands for);
    a single evicted token is dropped, and so is evicted frame text. Prototypes count against the budget:
    every layer keeps exactly as many tokens (kept + prototypes) as the budget, or as its frames allow. If the
    frames' prototypes alone would not fit, the oldest frames are dropped whole first.

    merge: false is the pure-eviction variant (no prototypes). selection: per_layer (the paper) or shared
    (scores averaged over layers, one set for the whole cache). Without room for the probe (a reduction
    forced by a chunk that does not fit) the recorded queries of the cache's last tokens, as many as the
    prompt has, stand in for it."""

    merge: bool = True
    selection: str = "per_layer"

    records_queries = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection}: choose one of: {', '.join(SELECTIONS)}")

    @property
    def name(self) -> str:
        return "streammem"

    def per_layer(self) -> bool:
        return self.selection == "per_layer"

    def merge_frames(self, cache: PositionedCache, rows: Records, slots: list[torch.Tensor], room: int, context: dict[str, Any]) -> list[Groups]:
        received = probe_attention(cache, context).float().mean(dim=1).cpu()  # [layers, length]: mean over heads
        scores = received if self.per_layer() else received.mean(dim=0, keepdim=True)
        frames = torch.unique(torch.cat([rows.frames[r, s] for r, s in enumerate(slots)]))  # ascending = oldest first
        first, target = self.first_frame_and_count(rows, slots, frames, room)
        planned = []
        for r, row_slots in enumerate(slots):
            row_slots = row_slots[rows.frames[r, row_slots] >= frames[first]] if first < len(frames) else row_slots[:0]
            planned.append(self.keep_and_fold(rows, r, row_slots, scores[r], target))
        return planned

    def first_frame_and_count(self, rows: Records, slots: list[torch.Tensor], frames: torch.Tensor, room: int) -> tuple[int, int]:
        """The oldest frame kept (index into `frames`) and the count of frame tokens every row keeps: the budget
        `room`, or less where a row has fewer frame tokens to keep; older frames are dropped while some row's
        prototypes (one per frame with two or more image tokens) would not fit."""
        least, most = [], []  # per row and first frame: the fewest tokens (all prototypes), the most (all kept)
        for r, row_slots in enumerate(slots):
            kinds, of = rows.kinds[r, row_slots], torch.searchsorted(frames, rows.frames[r, row_slots])
            images = torch.bincount(of[kinds == KIND["image"]], minlength=len(frames))
            text = torch.bincount(of[kinds == KIND["frame_text"]], minlength=len(frames))
            from_newest = lambda values: torch.flip(torch.cumsum(torch.flip(values, [0]), 0), [0])  # noqa: E731
            least.append(from_newest((images >= 2).long() if self.merge else torch.zeros_like(images)))
            most.append(from_newest(images + torch.where(images > 0, text, 0)))
        least, most = torch.stack(least), torch.stack(most)  # [rows, frames]
        for first in range(len(frames)):
            target = min(room, int(most[:, first].min()))
            if int(least[:, first].max()) <= target:
                return first, target
        return len(frames), 0

    def keep_and_fold(self, rows: Records, r: int, slots: torch.Tensor, scores: torch.Tensor, target: int) -> Groups:
        """Row r: the best-scored of its frame tokens `slots` (orphan rule) and a prototype per frame of its other
        image tokens (two or more), `target` tokens in all."""
        kinds, frames = rows.kinds[r, slots], rows.frames[r, slots]
        order, eligible = keep_order(scores[slots][None], kinds[None], frames[None], 0, True)
        order = order[0, : int(eligible[0])]
        image = kinds[order] == KIND["image"]
        step = torch.ones(len(order), dtype=torch.long)
        if self.merge:  # taking the second-to-last evicted image of a frame removes its prototype: no growth
            frame_ids, of = torch.unique(frames, return_inverse=True)
            per_frame = torch.bincount(of[kinds == KIND["image"]], minlength=len(frame_ids))
            ordered = of[order]
            taken = torch.cumsum(torch.nn.functional.one_hot(ordered, len(frame_ids)) * image[:, None], dim=0)
            nth = taken[torch.arange(len(order)), ordered]
            step -= (image & (nth == per_frame[ordered] - 1)).long()
            start = int((per_frame >= 2).sum())
        else:
            start = 0
        count = torch.cat([torch.tensor([start]), start + torch.cumsum(step, 0)])  # tokens held after taking k
        k = int((count <= target).sum()) - 1
        kept = torch.zeros(len(slots), dtype=torch.bool)
        kept[order[:k]] = True
        groups, weights = [slots[kept].view(-1, 1)], [torch.ones(int(kept.sum()), 1, dtype=torch.float64)]
        if self.merge:
            evicted = ~kept & (kinds == KIND["image"])
            folded = [slots[evicted & (frames == frame)] for frame in torch.unique(frames[evicted]).tolist()]
            folded = [members for members in folded if len(members) >= 2]
            if folded:
                members, _ = pad_groups(folded)
                groups.append(members)
                weights.append(torch.where(members >= 0, scores[members.clamp(min=0)].double(), 0.0))
        width = max(group.shape[1] for group in groups)
        members = torch.cat([torch.nn.functional.pad(g, (0, width - g.shape[1]), value=-1) for g in groups])
        weights = torch.cat([torch.nn.functional.pad(w, (0, width - w.shape[1])) for w in weights])
        if len(members) != target:
            raise RuntimeError(f"streammem: row {r} plans {len(members)} tokens for {target}")
        return members, weights


def probe_attention(cache: PositionedCache, context: dict[str, Any]) -> torch.Tensor:
    """The attention each cached token receives from the assistant prompt ([layers, kv_heads, length]; see
    snapkv.window_attention): the prompt fed on top of the cache by the runner's `probe(ids, measure)` and
    removed again. Without a probe, or without room for it, the last cached tokens (as many as the prompt has;
    one without a model) are the queries."""
    length = cache_length(cache)
    model, probe = context.get("model"), context.get("probe")
    ids = model.encode(model.chat.assistant_prompt) if model is not None else []
    if probe is not None and ids:
        received = probe(ids, lambda probed: window_attention(probed, len(ids)))
        if received is not None:
            return received[..., :length]
    return window_attention(cache, min(max(len(ids), 1), length))
