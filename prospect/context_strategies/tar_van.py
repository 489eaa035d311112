from __future__ import annotations

from dataclasses import dataclass

import torch

from prospect.cache import KIND, PositionedCache, rerotate
from prospect.context_strategies.budget import TextFirstKeep, frame_groups, mean_over_layers


def previous_patch(cache: PositionedCache, slots: torch.Tensor) -> torch.Tensor:
    """For each image token at `slots`, the slot of the same patch index in the nearest earlier frame held
    in the cache (-1 when there is none)."""
    image = torch.nonzero(cache.kinds == KIND["image"]).flatten()
    order = image[torch.argsort(cache.patches[image] * (len(cache.kinds) + 1) + image)]  # by patch, then slot
    earlier = torch.full((len(cache.kinds),), -1, dtype=torch.long)
    same_patch = cache.patches[order[1:]] == cache.patches[order[:-1]]
    earlier[order[1:][same_patch]] = order[:-1][same_patch]
    return earlier[slots]


def temporal_redundancy(cache: PositionedCache, slots: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
    """TaR: cosine similarity of each token's key to the key of `earlier` (same patch, previous frame), with
    RoPE undone on both (keys compared at one position), averaged over layers and heads."""
    device = next(iter(cache.layer_tensors()))[0].device
    now, before = slots.to(device), earlier.to(device)
    back_now, back_before = -cache.positions[slots], -cache.positions[earlier]

    def cosine(keys, values):
        a = rerotate(keys[:, :, now].float(), back_now, cache.inv_freq)
        b = rerotate(keys[:, :, before].float(), back_before, cache.inv_freq)
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)[0].mean(dim=0)

    return mean_over_layers(cache, cosine).cpu()


def value_norm(cache: PositionedCache, slots: torch.Tensor) -> torch.Tensor:
    """VaN: L2 norm of each token's values, averaged over layers and heads."""
    index = slots.to(next(iter(cache.layer_tensors()))[0].device)
    return mean_over_layers(cache, lambda keys, values: values[0][:, index].float().norm(dim=-1).mean(dim=0)).cpu()


@dataclass
class TarVan(TextFirstKeep):
    """`tar_van` (InfiniPot-V, Kim et al. 2025, arXiv 2506.15745): text first; the newest `protect_frames`
    frames are kept whole; of the rest of the budget, `tar_ratio` goes to the image tokens of lowest
    Temporal-axis Redundancy (TaR: key cosine to the nearest earlier cached token of the same patch, i.e. the
    same patch of the previous cached frame that still holds it) and the
    remainder to the highest Value Norms (VaN). Single image tokens may be dropped; a frame's frame_text
    tokens stay while one of its image tokens does (and count against the budget). Image tokens with no
    earlier frame in the cache have no TaR and compete on VaN only."""

    tar_ratio: float = 0.5
    protect_frames: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.tar_ratio <= 1.0:
            raise ValueError(f"tar_ratio={self.tar_ratio}: must be in [0.0, 1.0]")
        if self.protect_frames < 0:
            raise ValueError(f"protect_frames={self.protect_frames}: must be >= 0")

    @property
    def name(self) -> str:
        return "tar_van"

    def choose_frame_tokens(self, cache: PositionedCache, slots: torch.Tensor, budget: int) -> torch.Tensor:
        groups = frame_groups(cache, slots)
        protected: list[torch.Tensor] = []
        for group in reversed(groups[max(0, len(groups) - self.protect_frames) :] if self.protect_frames else []):
            if sum(map(len, protected)) + len(group) > budget:
                break
            protected.append(group)
        rest = torch.cat(groups[: len(groups) - len(protected)]) if len(groups) > len(protected) else torch.empty(0, dtype=torch.long)
        room = budget - sum(map(len, protected))
        image = rest[cache.kinds[rest] == KIND["image"]]
        text = rest[cache.kinds[rest] == KIND["frame_text"]]
        earlier = previous_patch(cache, image)
        has_earlier = earlier >= 0
        tar = torch.full((len(image),), float("inf"))
        if bool(has_earlier.any()):
            tar[has_earlier] = temporal_redundancy(cache, image[has_earlier], earlier[has_earlier])
        van = value_norm(cache, image) if len(image) else torch.empty(0)
        count = min(room, len(image))
        while count > 0:
            chosen = self._rank(tar, van, count, image)
            chosen_text = text[torch.isin(cache.frames[text], torch.unique(cache.frames[chosen]))]
            excess = count + len(chosen_text) - room
            if excess <= 0:
                return torch.cat(protected + [chosen, chosen_text])
            count -= max(1, excess // 2)  # fewer tokens usually touch fewer frames: back off gently
        return torch.cat(protected) if protected else torch.empty(0, dtype=torch.long)

    def _rank(self, tar: torch.Tensor, van: torch.Tensor, count: int, image: torch.Tensor) -> torch.Tensor:
        """`count` image tokens: round(tar_ratio * count) of lowest TaR, then the highest VaN of the others."""
        by_tar = torch.sort(tar, stable=True).indices
        by_tar = by_tar[torch.isfinite(tar[by_tar])][: int(self.tar_ratio * count + 0.5)]
        taken = torch.zeros(len(image), dtype=torch.bool)
        taken[by_tar] = True
        others = torch.nonzero(~taken).flatten()
        by_van = others[torch.sort(-van[others], stable=True).indices][: count - len(by_tar)]
        return image[torch.cat([by_tar, by_van])]
