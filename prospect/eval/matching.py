"""ProAssist's matching of generated to reference turns within one conversation (DESIGN §6).

Rows are the frames where the model spoke; columns are all frames 0..num_frames-1. The cost of
matching the generation at frame i to frame j is

    C[i, j] + D[i, j],  C = 1 - |similarity(gen_i, ref_j)| (1 when frame j is silent),
                        D = f * |j - i|^p / rg^p, rg = max(|left|, right),

an edge only when left <= j - i <= right (frames). The minimum-cost matching that uses every row
once comes from scipy's LAPJVsp (`min_weight_full_bipartite_matching`).

scipy drops zero entries of a sparse matrix before matching. ProAssist builds the sparse matrix
from a dense one (`csr_matrix(dense)`, inf outside the window), so a zero-cost pair (the same text
at the same frame) is not an edge and the generation is pushed elsewhere. By default every allowed
edge is shifted by the same EDGE_SHIFT instead, which keeps zero-cost pairs and does not change
which full matching is optimal (each row contributes the shift exactly once);
`proassist_exact=True` reproduces ProAssist's construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

SimilarityFn = Callable[[str, str], float]
"""similarity(gen_text, ref_text): cosine similarity in [-1, 1]; the semantic cost is 1 - |similarity|."""

EDGE_SHIFT = 1.0  # added to every allowed edge in the corrected construction


class NoFullMatching(ValueError):
    """No matching uses every generation once within the window (possible only with proassist_exact)."""


@dataclass(frozen=True)
class MatchedPair:
    """A generation matched to a frame that carries a reference. Frames are stream indices;
    score = 1 - C = |similarity| (the semantic score)."""

    gen_frame: int
    ref_frame: int
    score: float
    gen: str
    ref: str


@dataclass
class MatchResult:
    """Outcome of one conversation: matched pairs (correct or not), redundant generations (matched to
    a silent frame, by generation frame) and missed references (by reference frame)."""

    matched: list[MatchedPair] = field(default_factory=list)
    redundant: list[int] = field(default_factory=list)
    missed: list[int] = field(default_factory=list)
    num_generated: int = 0
    num_references: int = 0


def temporal_cost(offset: int, window: tuple[int, int], factor: float, power: float) -> float:
    """D for a generation `offset` = j - i frames before the reference; inf outside the window."""
    left, right = window
    if not left <= offset <= right:
        return float("inf")
    if offset == 0:
        return 0.0
    reach = max(abs(left), right)  # > 0 here, since 0 != offset lies within [left, right]
    return factor * abs(offset) ** power / reach**power


def match_conversation(
    gen: Mapping[int, str],
    ref: Mapping[int, str],
    num_frames: int,
    window: tuple[int, int],
    similarity: SimilarityFn,
    temporal_cost_factor: float = 0.3,
    temporal_cost_power: float = 1.5,
    proassist_exact: bool = False,
) -> MatchResult:
    """Match the generations of one conversation to its frames.

    gen, ref: frame index -> text (empty or absent = silent); num_frames: length of the stream;
    window: (left, right) in frames with left <= 0 <= right. Raises NoFullMatching when the rows
    cannot all be matched (only possible with proassist_exact, which removes zero-cost edges).
    """
    rows = sorted(i for i, text in gen.items() if text)
    references = sorted(j for j, text in ref.items() if text)
    for label, frames in (("generation", rows), ("reference", references)):
        if frames and not (0 <= frames[0] and frames[-1] < num_frames):
            raise ValueError(f"{label} frame outside 0..{num_frames - 1}: {frames[0] if frames[0] < 0 else frames[-1]}")
    left, right = window
    if not left <= 0 <= right:
        raise ValueError(f"window {window}: must satisfy left <= 0 <= right")
    result = MatchResult(num_generated=len(rows), num_references=len(references))
    if not rows:
        result.missed = references
        return result

    scores: dict[tuple[int, int], float] = {}  # s = |similarity| = 1 - C, for frames with a reference
    edges_row, edges_col, edges_cost = [], [], []
    for r, i in enumerate(rows):
        for j in range(max(0, i + left), min(num_frames, i + right + 1)):
            semantic = 1.0
            if ref.get(j):
                scores[r, j] = abs(float(similarity(gen[i], ref[j])))
                semantic = 1.0 - scores[r, j]
            edges_row.append(r)
            edges_col.append(j)
            edges_cost.append(semantic + temporal_cost(j - i, window, temporal_cost_factor, temporal_cost_power))

    shape = (len(rows), num_frames)
    if proassist_exact:
        dense = np.full(shape, np.inf)
        dense[edges_row, edges_col] = edges_cost
        graph = csr_matrix(dense)  # drops exact zeros: a perfect pair is no edge (ProAssist's quirk)
    else:
        graph = csr_matrix((np.asarray(edges_cost) + EDGE_SHIFT, (edges_row, edges_col)), shape=shape)
    try:
        matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
    except ValueError:
        detail = " (proassist_exact drops zero-cost edges)" if proassist_exact else ""
        raise NoFullMatching(
            f"no matching uses all {len(rows)} generations within the window {list(window)} frames{detail}"
        ) from None

    used = set()
    for r, j in sorted(zip(matched_rows.tolist(), matched_cols.tolist())):
        i = rows[r]
        used.add(j)
        if ref.get(j):
            result.matched.append(MatchedPair(i, j, scores[r, j], gen[i], ref[j]))
        else:
            result.redundant.append(i)
    result.missed = [j for j in references if j not in used]
    return result
