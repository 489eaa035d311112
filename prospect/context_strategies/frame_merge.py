from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prospect.cache import KIND, PositionedCache, Records, pad_groups
from prospect.context_strategies.merge_keep import Groups, MergeKeep


@dataclass
class _Frame:
    """A frame during planning: its image tokens by patch index (each a group of slots: one token, or several
    to be merged), image tokens without a patch index or without a partner, and its frame text (slots)."""

    patches: dict[int, list[int]]
    other: list[list[int]] = field(default_factory=list)
    text: list[int] = field(default_factory=list)

    def size(self) -> int:
        return len(self.patches) + len(self.other) + len(self.text)


@dataclass
class FrameMerge(MergeKeep):
    """`frame_merge` (StreamBridge, Wang et al. 2025, arXiv 2505.05467: round-decayed compression): over the
    threshold, keep the initial cache and every dialogue token after it (the newest if they alone exceed
    `last_keep_len`); then, while the tokens after the initial cache exceed `last_keep_len`, merge adjacent
    cached frames pairwise, oldest pair first, one round over the frames at a time: image token of patch i of
    the newer frame B is averaged into patch i of the older frame A (keys with RoPE undone, then rotated to
    A's token's position; weighted by the original tokens each already stands for, so a merged token is the
    mean over every frame it covers). The merged frame is A: A's slots, positions, frame index and frame
    text; B's frame text is dropped. An image token whose patch the partner lacks stays as it is (B's keep
    frame B's label, without text); the odd frame of a round waits for the next one. Should a single frame
    still not fit, it is dropped whole. One keep set for every layer and head."""

    @property
    def name(self) -> str:
        return "frame_merge"

    def merge_frames(self, cache: PositionedCache, rows: Records, slots: list[torch.Tensor], room: int, context: dict[str, Any]) -> list[Groups]:
        kinds, frames, patches = rows.kinds[0], rows.frames[0], rows.patches[0]
        planned: dict[int, _Frame] = {}
        for slot in slots[0].tolist():
            frame = planned.setdefault(int(frames[slot]), _Frame({}))
            if kinds[slot] == KIND["frame_text"]:
                frame.text.append(slot)
            elif int(patches[slot]) >= 0 and int(patches[slot]) not in frame.patches:
                frame.patches[int(patches[slot])] = [slot]
            else:
                frame.other.append([slot])
        queue = [f for f in planned.values() if f.patches or f.other]  # oldest first (by first slot); frame text
        total = sum(f.size() for f in queue)  # of a frame without image tokens is dropped
        while total > room and len(queue) > 1:  # one round: pairs (1, 2), (3, 4), ... oldest first
            merged, i = [], 0
            while i < len(queue):
                if total <= room or i + 1 == len(queue):
                    merged.extend(queue[i:])
                    break
                before = queue[i].size() + queue[i + 1].size()
                merged.append(_merge_pair(queue[i], queue[i + 1]))
                total -= before - merged[-1].size()
                i += 2
            queue = merged
        if total > room:
            queue = []
        groups = [sorted(g) for f in queue for g in list(f.patches.values()) + f.other] + [[slot] for f in queue for slot in f.text]
        members, _ = pad_groups(groups)
        return [(members, torch.where(members >= 0, rows.merged[0][members.clamp(min=0)].double(), 0.0))]


def _merge_pair(older: _Frame, newer: _Frame) -> _Frame:
    """`newer` folded into `older`: patch i with patch i; what has no partner stays; newer's frame text goes."""
    patches = {patch: group + newer.patches.get(patch, []) for patch, group in older.patches.items()}
    leftover = [group for patch, group in newer.patches.items() if patch not in older.patches]
    return _Frame(patches, older.other + newer.other + leftover, older.text)
