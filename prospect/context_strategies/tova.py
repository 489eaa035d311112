from __future__ import annotations

from dataclasses import dataclass

from prospect.context_strategies.snapkv import SnapKV


@dataclass
class TOVA(SnapKV):
    """`tova` (TOVA, Oren et al. 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104): over the
    threshold, keep the initial cache, the last token, and, in each layer, the tokens that receive the most
    attention from the last token's query, averaged over that layer's heads (the paper's layer-wise policy;
    kvpress's TOVAPress likewise), until `last_keep_len` is reached. SnapKV's scoring with a window of one
    query and no pooling.

    window: 1 (the last token); kernel: 1; selection: per_layer (the paper), per_head or shared."""

    window: int = 1
    kernel: int = 1
    selection: str = "per_layer"

    @property
    def name(self) -> str:
        return "tova"
