"""ProAssist's matching of generated to reference turns within one conversation (docs/evaluation.md).

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
which full matching is optimal (each row contributes the shift exactly once); costs are float64.

`proassist_exact=True` reproduces ProAssist's `find_match` arithmetic: the semantic costs of the
compared pairs come from one batch call in ProAssist's pair order (`semantic_cost`, float32), a
generation against a silent frame costs 1, D is computed with torch in float32 as ProAssist's
`get_distance_cost` does (|offset| ** p, then times the float multiplier f / rg^p), C + D is added
in float32, and the float32 dense matrix goes through `csr_matrix(dense)`: a pair whose float32
total is exactly 0 is no edge, one whose cosine came out 0.99999994 keeps its tiny cost. The score
of a matched pair is 1 - C as ProAssist computes it (C read back as a Python float).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

SimilarityFn = Callable[[str, str], float]
"""similarity(gen_text, ref_text): cosine similarity in [-1, 1]; the semantic cost is 1 - |similarity|."""

SemanticCostFn = Callable[[Sequence[tuple[str, str]]], Sequence[float]]
"""semantic_cost(pairs): float32 1 - |cos| of each (gen_text, ref_text) pair, computed in one call
(proassist_exact; see prospect.eval.embeddings.ProAssistSemanticCost)."""

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
    semantic_cost: SemanticCostFn | None = None,
) -> MatchResult:
    """Match the generations of one conversation to its frames.

    gen, ref: frame index -> text (empty or absent = silent); num_frames: length of the stream;
    window: (left, right) in frames with left <= 0 <= right. Raises NoFullMatching when the rows
    cannot all be matched (only possible with proassist_exact, which removes zero-cost edges).
    proassist_exact takes its semantic costs from semantic_cost when given, else float32
    1 - |float32(similarity)| pair by pair; the corrected matching uses similarity only.
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

    if proassist_exact:
        return _match_proassist_exact(
            gen, ref, rows, references, result, num_frames, window, similarity, semantic_cost,
            temporal_cost_factor, temporal_cost_power,
        )

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

    graph = csr_matrix((np.asarray(edges_cost) + EDGE_SHIFT, (edges_row, edges_col)), shape=(len(rows), num_frames))
    matched_rows, matched_cols = _full_matching(graph, len(rows), window, exact=False)
    return _outcomes(result, gen, ref, rows, references, matched_rows, matched_cols, lambda r, j: scores[r, j])


def proassist_distance_costs(reach: int, window: tuple[int, int], factor: float, power: float) -> np.ndarray:
    """ProAssist's float32 D for |offset| = 0..reach (before the window mask).

    As `get_distance_cost`: float32 |offset| ** power with torch, times the Python float
    multiplier factor / rg**power (rg = max(|left|, right)), in float32. The table is padded to whole
    64-element blocks so every entry takes torch's vectorised pow, the path of all but the last few
    elements of each thread's share of ProAssist's frames x frames matrix (its scalar tail rounds
    differently for some offsets >= 70 frames). rg = 0 (window (0, 0), where ProAssist divides by
    zero) gives D = 0 at the only allowed offset.
    """
    import torch  # lazy: torch loads only for eval.proassist_exact

    rg = max(abs(window[0]), window[1])
    if rg == 0:
        return np.zeros(reach + 1, dtype=np.float32)
    multiplier = factor / (rg**power)
    blocks = -(-(reach + 1) // 64) * 64
    offsets = torch.arange(blocks, dtype=torch.float32).abs()
    return ((offsets**power) * multiplier).numpy()[: reach + 1]


def _match_proassist_exact(
    gen: Mapping[int, str],
    ref: Mapping[int, str],
    rows: list[int],
    references: list[int],
    result: MatchResult,
    num_frames: int,
    window: tuple[int, int],
    similarity: SimilarityFn,
    semantic_cost: SemanticCostFn | None,
    factor: float,
    power: float,
) -> MatchResult:
    """ProAssist's find_match on the rows of the speaking generations (see the module docstring)."""
    left, right = window
    # the compared pairs, in ProAssist's order: generation frame, then reference frame within the window
    where_rows, where_cols, pairs = [], [], []
    for r, i in enumerate(rows):
        for j in range(max(i + left, 0), min(i + right + 1, num_frames)):
            if ref.get(j):
                where_rows.append(r)
                where_cols.append(j)
                pairs.append((gen[i], ref[j]))
    if semantic_cost is not None:
        costs = np.asarray(semantic_cost(pairs), dtype=np.float32)
    else:
        costs = np.asarray([np.float32(1) - np.abs(np.float32(similarity(g, t))) for g, t in pairs], dtype=np.float32)
    if costs.shape != (len(pairs),):
        raise ValueError(f"semantic_cost returned {costs.shape[0] if costs.ndim else 'no'} costs for {len(pairs)} pairs")

    shape = (len(rows), num_frames)
    # talk/no-talk cost (1 - g*r)/2 for a speaking generation: 1 against silence, 0 against a reference
    match_cost = np.ones(shape, dtype=np.float32)
    match_cost[:, references] = 0
    match_cost[where_rows, where_cols] = costs
    table = proassist_distance_costs(max(abs(left), right), window, factor, power)
    dist_cost = np.full(shape, np.inf, dtype=np.float32)
    for r, i in enumerate(rows):
        lo, hi = max(i + left, 0), min(i + right + 1, num_frames)
        dist_cost[r, lo:hi] = table[np.abs(np.arange(lo, hi) - i)]
    graph = csr_matrix(match_cost + dist_cost)  # float32; drops exact zeros: a perfect pair is no edge
    matched_rows, matched_cols = _full_matching(graph, len(rows), window, exact=True)
    return _outcomes(result, gen, ref, rows, references, matched_rows, matched_cols, lambda r, j: 1 - match_cost[r, j].item())


def _full_matching(graph: csr_matrix, num_rows: int, window: tuple[int, int], exact: bool) -> tuple[np.ndarray, np.ndarray]:
    try:
        return min_weight_full_bipartite_matching(graph)
    except ValueError:
        detail = " (proassist_exact drops zero-cost edges)" if exact else ""
        raise NoFullMatching(
            f"no matching uses all {num_rows} generations within the window {list(window)} frames{detail}"
        ) from None


def _outcomes(
    result: MatchResult,
    gen: Mapping[int, str],
    ref: Mapping[int, str],
    rows: list[int],
    references: list[int],
    matched_rows: np.ndarray,
    matched_cols: np.ndarray,
    score: Callable[[int, int], float],
) -> MatchResult:
    used = set()
    for r, j in sorted(zip(matched_rows.tolist(), matched_cols.tolist())):
        i = rows[r]
        used.add(j)
        if ref.get(j):
            result.matched.append(MatchedPair(i, j, score(r, j), gen[i], ref[j]))
        else:
            result.redundant.append(i)
    result.missed = [j for j in references if j not in used]
    return result
