"""ProAssist-protocol evaluation: hand-worked matching cases, micro-averaging, the zero-cost quirk,
the real sentence model, NLG scores and the `prospect.evaluate` CLI."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from prospect.eval import PREDICTIONS_SCHEMA, EvalSettings, EvalSetupError, PredictionsError, evaluate_predictions
from prospect.eval.matching import MatchedPair, NoFullMatching, match_conversation, temporal_cost
from prospect.eval.metrics import (
    F1, JACCARD_INDEX, METRIC_NAMES, MISSING_RATE, NUM_CONVERSATIONS, NUM_MATCHED, NUM_MISMATCHED, NUM_MISSED,
    NUM_REDUNDANT, PRECISION, RECALL, REDUNDANT_RATE, SEMANTIC_SCORE, TIME_DIFF, Tally, summarize,
)
from prospect.eval.windows import DEFAULT_WINDOW, window_frames, window_seconds

WINDOW = (-4, 8)  # assembly101 at 2 fps, in frames
F, P = 0.3, 1.5


def table(values: dict[tuple[str, str], float]):
    """A hand similarity: the listed (gen, ref) pairs, 0 for every other pair."""
    return lambda gen, ref: values.get((gen, ref), 0.0)


def match(gen: dict, ref: dict, values: dict, num_frames: int = 40, window=WINDOW, exact: bool = False):
    return match_conversation(gen, ref, num_frames, window, table(values), F, P, exact)


def d(offset: int, reach: int = 8) -> float:
    """The temporal cost by hand: f * |offset|^p / reach^p."""
    return F * abs(offset) ** P / reach**P


# ---- windows -----------------------------------------------------------------------------------------


def test_window_table_first_matching_substring_and_override():
    assert window_seconds("assembly101") == (-2.0, 4.0)
    assert window_seconds("ego4d") == (-4.0, 8.5)
    assert window_seconds("ego4d_narration") == (-2.5, 2.5)  # narration comes first in the table
    assert window_seconds("EPICKitchens-100") == (-1.5, 3.0)
    assert window_seconds("synthetic") == DEFAULT_WINDOW == (-2.5, 2.5)
    assert window_seconds("ego4d", override=[-1, 2]) == (-1.0, 2.0)


def test_window_frames_truncate_toward_zero():
    assert window_frames((-2.0, 4.0), 2) == (-4, 8)  # assembly101 at 2 fps
    assert window_frames((-1.5, 2.5), 3) == (-4, 7)  # -4.5 -> -4, 7.5 -> 7
    assert window_frames((-4.0, 8.5), 2) == (-8, 17)
    assert window_frames((-0.4, 0.4), 2) == (0, 0)


def test_temporal_cost_by_hand():
    assert temporal_cost(0, WINDOW, F, P) == 0.0
    assert temporal_cost(8, WINDOW, F, P) == pytest.approx(0.3)  # rg = max(|l|, r) = 8
    assert temporal_cost(-4, WINDOW, F, P) == pytest.approx(0.3 * 0.5**1.5)
    assert temporal_cost(9, WINDOW, F, P) == math.inf and temporal_cost(-5, WINDOW, F, P) == math.inf
    assert temporal_cost(0, (0, 0), F, P) == 0.0


# ---- outcomes of one conversation --------------------------------------------------------------------


def test_matched_correct():
    result = match({5: "g"}, {5: "r"}, {("g", "r"): 0.9})
    assert result.matched == [MatchedPair(5, 5, 0.9, "g", "r")]
    assert result.redundant == [] and result.missed == []
    metrics = summarize(Tally.from_match(result, 0.5, fps=2))
    assert (metrics[PRECISION], metrics[RECALL], metrics[F1], metrics[JACCARD_INDEX]) == (1.0, 1.0, 1.0, 1.0)
    assert metrics[SEMANTIC_SCORE] == 0.9 and metrics[TIME_DIFF] == 0.0 and metrics[NUM_MATCHED] == 1


@pytest.mark.parametrize("score", [0.3, 0.5])
def test_matched_but_incorrect_at_or_below_threshold(score):
    # cost 1 - score at the reference beats 1 + D at any silent frame, so the pair is matched ...
    result = match({5: "g"}, {5: "r"}, {("g", "r"): score})
    assert [(p.gen_frame, p.ref_frame, p.score) for p in result.matched] == [(5, 5, score)]
    metrics = summarize(Tally.from_match(result, 0.5, fps=2))
    # ... but not correct (score > 0.5 is strict)
    assert (metrics[NUM_MATCHED], metrics[NUM_MISMATCHED]) == (0, 1)
    assert metrics[PRECISION] == metrics[RECALL] == metrics[F1] == 0.0
    # semantic_score averages scores >= threshold (ProAssist's quirk): 0.5 counts, 0.3 does not
    assert metrics[SEMANTIC_SCORE] == (0.5 if score == 0.5 else 0.0)


def test_redundant_generation_and_zero_denominators():
    result = match({5: "g"}, {}, {})
    assert result.redundant == [5] and result.matched == [] and result.missed == []
    metrics = summarize(Tally.from_match(result, 0.5, fps=2))
    assert metrics[PRECISION] == 0.0 and metrics[REDUNDANT_RATE] == 1.0
    # recall = M / (M_all + Miss) = 0 / 0, missing_rate = 0 / 0: defined as 0
    assert metrics[RECALL] == metrics[MISSING_RATE] == metrics[F1] == 0.0
    assert metrics[SEMANTIC_SCORE] == metrics[TIME_DIFF] == 0.0


def test_missed_reference():
    result = match({}, {3: "r"}, {})
    assert result.missed == [3] and result.matched == [] and result.redundant == []
    metrics = summarize(Tally.from_match(result, 0.5, fps=2))
    assert metrics[MISSING_RATE] == 1.0 and metrics[RECALL] == 0.0
    assert metrics[PRECISION] == metrics[REDUNDANT_RATE] == 0.0  # 0 / 0


def test_nothing_at_all_is_all_zero():
    metrics = summarize(Tally.from_match(match({}, {}, {}), 0.5, fps=2))
    assert set(metrics) == set(METRIC_NAMES)
    assert all(value == 0 for value in metrics.values())


@pytest.mark.parametrize(
    "ref_frame,allowed",
    [(18, True), (19, False), (6, True), (5, False)],
    ids=["right-edge", "right+1", "left-edge", "left-1"],
)
def test_window_edges(ref_frame, allowed):
    # generation at frame 10, window (-4, 8): j - i = 8 and -4 are allowed, 9 and -5 are not
    result = match({10: "g"}, {ref_frame: "r"}, {("g", "r"): 0.9})
    if allowed:
        assert [(p.gen_frame, p.ref_frame) for p in result.matched] == [(10, ref_frame)]
        assert result.missed == [] and result.redundant == []
    else:
        assert result.matched == [] and result.redundant == [10] and result.missed == [ref_frame]


def test_window_clipped_at_stream_ends():
    result = match({0: "g"}, {1: "r"}, {("g", "r"): 0.9}, num_frames=2)
    assert [(p.gen_frame, p.ref_frame) for p in result.matched] == [(0, 1)]


def test_temporal_cost_breaks_ties_and_trades_off_semantics():
    # same similarity 0.8 two frames early vs four frames late: D = 0.0375 < 0.106, the early one wins
    result = match({10: "g"}, {8: "a", 14: "b"}, {("g", "a"): 0.8, ("g", "b"): 0.8})
    assert [(p.gen_frame, p.ref_frame) for p in result.matched] == [(10, 8)] and result.missed == [14]
    # 0.45 + 0 at the same frame loses to 0.1 + d(2) = 0.1375 two frames later
    result = match({10: "g"}, {10: "a", 12: "b"}, {("g", "a"): 0.55, ("g", "b"): 0.9})
    assert [(p.ref_frame, p.score) for p in result.matched] == [(12, 0.9)] and result.missed == [10]
    assert 0.1 + d(2) < 0.45


def test_two_generations_compete_for_one_reference():
    # a@5 -> ref@6 (0.1 + d(1)) and b -> silent 5 or 7 (1 + d(1)) = 1.13 beats a -> silent (1) and b -> ref (0.4) = 1.4
    result = match({5: "a", 6: "b"}, {6: "r"}, {("a", "r"): 0.9, ("b", "r"): 0.6})
    assert [(p.gen_frame, p.ref_frame, p.score) for p in result.matched] == [(5, 6, 0.9)]
    assert result.redundant == [6] and result.missed == []


def test_time_diff_is_seconds_over_correct_pairs():
    result = match({10: "g", 30: "h"}, {14: "r", 30: "s"}, {("g", "r"): 0.9, ("h", "s"): 0.4})
    metrics = summarize(Tally.from_match(result, 0.5, fps=2))
    assert metrics[NUM_MATCHED] == 1 and metrics[NUM_MISMATCHED] == 1
    assert metrics[TIME_DIFF] == 2.0  # 4 frames at 2 fps; the incorrect pair (offset 0) is not averaged


def test_oracle_zero_cost_quirk_with_proassist_exact():
    gen = ref = {4: "x", 20: "y", 36: "z"}
    oracle = {(t, t): 1.0 for t in gen.values()}
    corrected = match(gen, ref, oracle)
    assert [(p.gen_frame, p.ref_frame) for p in corrected.matched] == [(4, 4), (20, 20), (36, 36)]
    # csr_matrix(dense) drops the zero-cost diagonal: each generation lands on a silent neighbour
    exact = match(gen, ref, oracle, exact=True)
    assert exact.matched == [] and exact.redundant == [4, 20, 36] and exact.missed == [4, 20, 36]
    with pytest.raises(NoFullMatching, match="proassist_exact"):
        match({0: "x"}, {0: "x"}, {("x", "x"): 1.0}, num_frames=1, exact=True)


# ---- proassist_exact: ProAssist's float32 arithmetic ----------------------------------------------------


def recorded_costs(costs: dict[tuple[str, str], float], calls: list):
    """A semantic_cost that records each call's pairs and returns the listed float32 costs (1 otherwise)."""

    def semantic_cost(pairs):
        calls.append(list(pairs))
        return np.array([costs.get(pair, 1.0) for pair in pairs], dtype=np.float32)

    return semantic_cost


def test_proassist_exact_compares_pairs_in_proassists_order_in_one_call():
    calls: list = []
    gen = {3: "g", 6: "h"}
    ref = {1: "a", 4: "b", 9: "c", 15: "d"}
    match_conversation(gen, ref, 20, (-2, 3), None, F, P, True, recorded_costs({}, calls))
    # generation frames ascending, then reference frames ascending within [i - 2, i + 3]; one call
    assert calls == [[("g", "a"), ("g", "b"), ("h", "b"), ("h", "c")]]
    with pytest.raises(ValueError, match="semantic_cost returned 1 costs for 4 pairs"):
        match_conversation(gen, ref, 20, (-2, 3), None, F, P, True, lambda pairs: np.zeros(1, np.float32))


@pytest.mark.parametrize(
    "cost,survives",
    [(0.0, False), (np.float32(1) - np.float32(0.99999994), True), (np.float32(1) - np.float32(1.0000001), True)],
    ids=["cos-1.0", "cos-0.99999994", "cos-1.0000001"],
)
def test_proassist_exact_only_an_exact_float32_zero_is_dropped(cost, survives):
    gen = ref = {10: "s"}
    result = match_conversation(gen, ref, 20, WINDOW, None, F, P, True, recorded_costs({("s", "s"): cost}, []))
    if survives:  # a tiny (even negative) cost is a stored entry: the perfect pair is matched
        assert [(p.gen_frame, p.ref_frame) for p in result.matched] == [(10, 10)]
        assert result.matched[0].score == 1.0 - float(np.float32(cost)) != 1.0  # ProAssist's 1 - C, C read as float32
        assert result.redundant == [] and result.missed == []
    else:  # csr_matrix(dense) drops the zero: the generation lands on a silent neighbour
        assert result.matched == [] and result.redundant == [10] and result.missed == [10]
    corrected = match_conversation(gen, ref, 20, WINDOW, table({("s", "s"): 1.0}), F, P)
    assert [(p.gen_frame, p.ref_frame, p.score) for p in corrected.matched] == [(10, 10, 1.0)]


def test_proassist_distance_costs_equal_proassists_frames_by_frames_matrix():
    import torch

    from prospect.eval.matching import proassist_distance_costs

    n, window = 60, (-4, 8)
    # get_distance_cost as ProAssist writes it: float32 |i - j| ** p, times the Python float f / rg^p
    frames = torch.arange(1, n + 1, dtype=torch.float32)
    full = ((frames[:, None] - frames).abs() ** P * (F / 8**P)).numpy()
    table_ = proassist_distance_costs(8, window, F, P)
    assert table_.dtype == np.float32 and table_[0] == 0.0 and table_[8] == np.float32(0.3)
    for i in range(n):
        for j in range(max(0, i - 4), min(n, i + 9)):
            assert table_[abs(j - i)] == full[i, j]
    assert proassist_distance_costs(0, (0, 0), F, P).tolist() == [0.0]


def test_proassist_semantic_cost_calls_encode_as_proassist_does(monkeypatch):
    import torch

    import prospect.eval.embeddings as embeddings

    calls = []
    vectors = {"a": [3.0, 4.0], "b": [4.0, 3.0], "c": [0.0, -2.0]}  # not unit length: pairwise_cos_sim normalises

    class FakeModel:
        def encode(self, strings, **kwargs):
            calls.append((list(strings), kwargs))
            return torch.tensor([vectors[t] for t in strings], dtype=torch.float32)

    monkeypatch.setitem(embeddings._MODELS, "fake", FakeModel())
    costs = embeddings.ProAssistSemanticCost("fake")([("a", "b"), ("a", "c"), ("c", "c")])
    # one call on the flat list gen_1, ref_1, gen_2, ... with ProAssist's keyword arguments
    assert calls == [(["a", "b", "a", "c", "c", "c"], {"convert_to_tensor": True, "show_progress_bar": False, "batch_size": 128})]
    assert costs.dtype == np.float32
    assert costs.tolist() == pytest.approx([1 - 24 / 25, 1 - 0.8, 0.0], abs=1e-6)  # |cos(a, c)| = 0.8
    assert costs[2] == 0.0  # c / |c| = (0, -1) exactly


# Candidates for a real-model case of each kind: on this CPU MiniLM gives identical strings a float32
# cosine of exactly 1.0 for some and 0.99999994 / 1.0000001 for others.
SELF_PAIR_CANDIDATES = [
    "Now unscrew the second wheel.", "Attach the cabin to the chassis.", "Put the ladder on top of the truck.",
    "Great job, the fire truck is done.", "Cut the onion.", "Good.", "Open the lid.", "Turn it over.",
    "Take the screwdriver from the table.", "Add the salt.", "Next, fold the paper.", "Hold the base steady.",
    "Place the lid on the pot.", "Yes.", "Well done!",
]


def self_pair_cost(text: str) -> np.float32:
    """1 - |cos| of (text, text) as ProAssist computes it, straight from sentence-transformers."""
    import torch
    from sentence_transformers.util import pairwise_cos_sim

    from prospect.eval.embeddings import load_sentence_model

    model = load_sentence_model(EvalSettings().sentence_model)
    vectors = model.encode([text, text], convert_to_tensor=True, show_progress_bar=False, batch_size=128)
    assert vectors.dtype == torch.float32
    return (1 - pairwise_cos_sim(vectors[:1], vectors[1:]).abs()).numpy()[0]


def test_real_embeddings_proassist_exact_drops_only_float32_zero_cost_pairs():
    from prospect.eval.embeddings import ProAssistSemanticCost

    costs: dict[str, np.float32] = {}
    for text in SELF_PAIR_CANDIDATES:  # until one of each kind is found
        costs[text] = self_pair_cost(text)
        zero = next((t for t, c in costs.items() if c == 0), None)
        tiny = next((t for t, c in costs.items() if c != 0), None)
        if zero and tiny:
            break
    assert zero is not None and tiny is not None, f"float32 self-pair costs on this machine: {costs}"
    assert abs(float(costs[tiny])) < 1e-6
    semantic_cost = ProAssistSemanticCost(EvalSettings().sentence_model)
    assert semantic_cost([(zero, zero), (tiny, tiny)]).dtype == np.float32
    assert semantic_cost([(tiny, tiny)])[0] == costs[tiny]

    doc = document(
        conversation("zero/x", "assembly101", [(10, zero, zero)], num_frames=20),
        conversation("tiny/x", "assembly101", [(10, tiny, tiny)], num_frames=20),
    )
    exact = evaluate_predictions(doc, EvalSettings(proassist_exact=True))
    dropped, kept = exact["per_conversation"]["zero/x"], exact["per_conversation"]["tiny/x"]
    assert (dropped[NUM_MATCHED], dropped[NUM_MISSED], dropped[NUM_REDUNDANT], dropped[F1]) == (0, 1, 1, 0.0)
    assert (kept[NUM_MATCHED], kept[NUM_MISSED], kept[NUM_REDUNDANT], kept[F1]) == (1, 0, 0, 1.0)
    assert kept[SEMANTIC_SCORE] == 1.0 - float(costs[tiny])  # ProAssist's 1 - C, not forced to 1.0
    # pooled: M = 1, M_all = 1, Red = 1, Miss = 1
    assert (exact["metrics"][PRECISION], exact["metrics"][RECALL], exact["metrics"][F1]) == (0.5, 0.5, 0.5)
    # the corrected default matches both perfect pairs
    default = evaluate_predictions(doc, EvalSettings())
    assert default["metrics"][F1] == 1.0 and default["metrics"][NUM_MATCHED] == 2
    assert default["metrics"][SEMANTIC_SCORE] == 1.0


# ---- documents: micro-averaging, skipped conversations -------------------------------------------------


def conversation(cid: str, subset: str, frames: list[tuple[int, str, str]], num_frames: int = 40, fps: float = 2.0, **extra) -> dict:
    return {
        "id": cid, "video_uid": cid.split("/")[0], "subset": subset, "user_type": "beginner", "fps": fps,
        "num_frames": num_frames, "frames": [{"index": i, "time": (i + 1) / fps, "gen": g, "ref": r} for i, g, r in frames],
        **extra,
    }


def document(*conversations: dict) -> dict:
    return {"schema": PREDICTIONS_SCHEMA, "conversations": list(conversations)}


HAND = {("a1", "A1"): 0.9, ("b1", "B1"): 0.7, ("c1", "C1"): 0.8}
TWO_PLUS_ONE = document(
    # A: one correct pair 2 frames early (1.0 s), one redundant generation
    conversation("va/x", "assembly101", [(10, "a1", ""), (12, "", "A1"), (30, "a2", "")]),
    # B: one correct pair at its frame, three missed references
    conversation("vb/x", "assembly101", [(5, "b1", "B1"), (15, "", "B2"), (25, "", "B3"), (35, "", "B4")]),
    # C (another subset): one correct pair
    conversation("vc/x", "ego4d", [(7, "c1", "C1")]),
    conversation("vd/x", "assembly101", [], error="RuntimeError: out of memory"),
)


def test_micro_average_by_hand():
    result = evaluate_predictions(TWO_PLUS_ONE, EvalSettings(), similarity=table(HAND))
    pooled = result["per_subset"]["assembly101"]
    # M = 2, M_all = 2, Red = 1, Miss = 3
    assert pooled[PRECISION] == pytest.approx(2 / 3) and pooled[RECALL] == pytest.approx(2 / 5)
    assert pooled[F1] == pytest.approx(0.5)  # the macro average would be (2/3 + 2/5) / 2
    assert pooled[JACCARD_INDEX] == pytest.approx(1 / 3)
    assert pooled[MISSING_RATE] == pytest.approx(3 / 5) and pooled[REDUNDANT_RATE] == pytest.approx(1 / 3)
    assert pooled[SEMANTIC_SCORE] == pytest.approx(0.8) and pooled[TIME_DIFF] == pytest.approx(0.5)
    assert (pooled[NUM_MATCHED], pooled[NUM_MISSED], pooled[NUM_REDUNDANT], pooled[NUM_CONVERSATIONS]) == (2, 3, 1, 2)
    assert result["per_conversation"]["va/x"][F1] == pytest.approx(2 / 3)
    assert result["per_conversation"]["vb/x"][F1] == pytest.approx(0.4)
    overall = result["metrics"]  # M = 3, Red = 1, Miss = 3
    assert overall[PRECISION] == pytest.approx(3 / 4) and overall[RECALL] == pytest.approx(3 / 6)
    assert overall[NUM_CONVERSATIONS] == 3
    assert result["skipped"] == [{"id": "vd/x", "error": "RuntimeError: out of memory"}]
    assert set(result["per_conversation"]) == {"va/x", "vb/x", "vc/x"}
    assert result["eval"]["windows"] == {
        "assembly101": {"seconds": [-2.0, 4.0], "frames": {"2": [-4, 8]}},
        "ego4d": {"seconds": [-4.0, 8.5], "frames": {"2": [-8, 17]}},
    }


def test_window_override_and_unmatchable_conversation_is_skipped():
    doc = document(
        conversation("va/x", "assembly101", [(10, "a1", ""), (12, "", "A1")]),
        conversation("ve/x", "assembly101", [(0, "x", "x")], num_frames=1),
    )
    result = evaluate_predictions(doc, {"window": [-0.5, 0.5], "proassist_exact": True}, similarity=table(HAND | {("x", "x"): 1.0}))
    assert result["per_conversation"]["va/x"][NUM_MISSED] == 1  # 2 frames apart, window (-1, 1) frames
    assert result["eval"]["windows"]["assembly101"]["frames"] == {"2": [-1, 1]}
    assert [entry["id"] for entry in result["skipped"]] == ["ve/x"]
    assert "no matching uses all 1 generations" in result["skipped"][0]["error"]


def test_eval_none_and_unknown_keys_are_refused():
    with pytest.raises(EvalSetupError, match="eval=none: scoring is disabled"):
        evaluate_predictions(document(), {"name": "none"}, similarity=table({}))
    with pytest.raises(EvalSetupError, match="eval.windw: unknown key"):
        EvalSettings.from_config({"windw": [-1, 1]})


BAD_DOCUMENTS = [
    ([], "expected a JSON object"),
    ({"conversations": []}, "schema missing"),
    ({"schema": "prospect.predictions/0", "conversations": []}, "schema='prospect.predictions/0'"),
    ({"schema": PREDICTIONS_SCHEMA}, "conversations: missing or not a list"),
    (document({"video_uid": "v"}), "conversations[0].id: missing"),
    (document({k: v for k, v in conversation("v/x", "s", []).items() if k != "fps"}), "conversations[0] (id=v/x): missing key 'fps'"),
    (document(conversation("v/x", "s", [(40, "g", "")])), "frames[0].index=40: out of range 0..39"),
    (document(conversation("v/x", "s", [(-1, "g", "")])), "frames[0].index=-1: out of range"),
    (document(conversation("v/x", "s", [(3, "g", ""), (3, "h", "")])), "frames[1].index=3: duplicate frame"),
    (document(conversation("v/x", "s", [], fps=0)), "fps=0: must be a positive number"),
    (document(conversation("v/x", "s", []), conversation("v/x", "s", [])), "conversations[1] (id=v/x): duplicate id"),
    (document({**conversation("v/x", "s", []), "frames": [{"index": 1, "gen": "g"}]}), "frames[0]: missing key 'ref'"),
]


@pytest.mark.parametrize("doc,expected", BAD_DOCUMENTS, ids=[e for _, e in BAD_DOCUMENTS])
def test_bad_documents_fail_in_one_line(doc, expected):
    with pytest.raises(PredictionsError) as raised:
        evaluate_predictions(doc, EvalSettings(), similarity=table({}))
    assert expected in str(raised.value) and "\n" not in str(raised.value)


# ---- real sentence model -------------------------------------------------------------------------------

ORACLE_TEXTS = [
    "Now unscrew the second wheel.", "Attach the cabin to the chassis.", "Great job, the fire truck is done.",
    "Take the screwdriver from the table.", "Put the ladder on top of the truck.",
]


def oracle_document() -> dict:
    frames = [(4 + 9 * k, text, text) for k, text in enumerate(ORACLE_TEXTS)]
    return document(conversation("oracle/x", "assembly101", frames, num_frames=50))


def test_real_embeddings_oracle_scores_one_and_is_deterministic():
    doc = oracle_document()
    first = evaluate_predictions(doc, EvalSettings())
    assert first["metrics"][F1] == 1.0 and first["metrics"][SEMANTIC_SCORE] == 1.0
    assert evaluate_predictions(doc, EvalSettings()) == first
    exact = evaluate_predictions(doc, EvalSettings(proassist_exact=True))
    assert exact["metrics"][F1] < 1.0


def test_real_embeddings_paraphrase_matches_and_unrelated_does_not():
    doc = document(conversation("p/x", "assembly101", [
        (4, "Now remove the second wheel.", "Now unscrew the second wheel."),
        (30, "The weather is lovely in Paris.", "Attach the cabin to the chassis."),
    ]))
    result = evaluate_predictions(doc, EvalSettings())
    per = result["per_conversation"]["p/x"]
    assert per[NUM_MATCHED] == 1 and per[NUM_MISMATCHED] + per[NUM_REDUNDANT] == 1


def test_missing_sentence_model_is_one_line():
    with pytest.raises(EvalSetupError, match=r"eval.sentence_model=/nonexistent/model: no such directory"):
        evaluate_predictions(oracle_document(), EvalSettings(sentence_model="/nonexistent/model"))
    with pytest.raises(EvalSetupError, match=r"package no_such_pkg is not installed; run: pip install no-such-pkg"):
        evaluate_predictions(oracle_document(), EvalSettings(sentence_model="package:no_such_pkg/model"))


# ---- NLG ------------------------------------------------------------------------------------------------


def test_tokenize_for_nlg():
    from prospect.eval.nlg import tokenize

    assert tokenize("Now, unscrew the WHEEL!") == "now unscrew the wheel"
    assert tokenize("Don't stop -- it's fine.") == "don't stop it's fine"


def test_nlg_metrics_without_java(monkeypatch, caplog):
    pytest.importorskip("pycocoevalcap.bleu.bleu")
    import prospect.eval.nlg as nlg

    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="prospect.eval.nlg"):
        result = evaluate_predictions(TWO_PLUS_ONE, EvalSettings(nlg_metrics=True), similarity=table(HAND))
    assert "METEOR is skipped" in caplog.text
    metrics = result["metrics"]
    assert "METEOR" not in metrics and {"Bleu_1", "Bleu_4", "CIDEr", "Bleu_4_w", "CIDEr_w"} <= set(metrics)
    assert metrics["Bleu_1_w"] == pytest.approx(metrics[JACCARD_INDEX] * metrics["Bleu_1"])
    assert metrics["Bleu_1"] == pytest.approx(1.0, abs=1e-6)  # "a1" vs "A1": equal after lower-casing
    assert "Bleu_1" in result["per_subset"]["ego4d"] and "Bleu_1" not in result["per_conversation"]["vc/x"]


def test_nlg_extra_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)
    with pytest.raises(EvalSetupError, match=r"pip install prospect\[nlg\]"):
        evaluate_predictions(TWO_PLUS_ONE, EvalSettings(nlg_metrics=True), similarity=table(HAND))


@pytest.mark.slow
def test_nlg_metrics_with_meteor(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("METEOR's Java start-up takes ~15 s; run with -m slow")
    pytest.importorskip("pycocoevalcap.meteor.meteor")
    if shutil.which("java") is None:
        pytest.skip("java is not on PATH")
    result = evaluate_predictions(oracle_document(), EvalSettings(nlg_metrics=True), similarity=lambda g, r: float(g == r))
    assert result["metrics"]["METEOR"] == pytest.approx(1.0, abs=1e-3)


# ---- CLI ------------------------------------------------------------------------------------------------


def run_cli(monkeypatch, *args: str) -> int:
    from prospect.evaluate import cli

    monkeypatch.setattr(sys, "argv", ["prospect.evaluate", *args])
    try:
        cli()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def test_cli_writes_metrics_json_and_table_reproducibly(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "predictions.json").write_text(json.dumps(oracle_document()))
    monkeypatch.chdir(tmp_path)
    assert run_cli(monkeypatch, f"predictions={run_dir / 'predictions.json'}") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["subset", "convs", "P", "R", "F1"]
    assert lines[2].split()[:5] == ["assembly101", "1", "1.000", "1.000", "1.000"]
    assert lines[3].split()[:5] == ["overall", "1", "1.000", "1.000", "1.000"]
    written = (run_dir / "metrics.json").read_text()
    metrics = json.loads(written)
    assert set(metrics) == {"metrics", "per_subset", "per_conversation", "intervals", "skipped", "notes", "eval"}
    assert metrics == evaluate_predictions(oracle_document(), EvalSettings())
    # a file without the stream's measurements (as before prospect recorded them) evaluates and says so once
    notes = [line for line in lines if line.startswith("note: ")]
    assert notes == ["note: no reference scores (ref_ppl, ref_nll, ref_top1) and speak probabilities (speak_auc): the "
                     "predictions were made without them (before prospect recorded them, or with eval.reference_scores=false "
                     "or eval.speak_probe=false under gt_turns); the other metrics are complete"]
    assert "ref_ppl" not in metrics["metrics"] and lines[0].split()[-3:] == ["ref_ppl", "ref_top1", "speak_auc"]
    assert lines[3].split()[-3:] == ["-", "-", "-"]
    # only metrics.json is written: no outputs/, .hydra/ or log file
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["metrics.json", "predictions.json", "run"]
    assert run_cli(monkeypatch, f"predictions={run_dir}", "eval.batch_size=2") == 0  # a run directory works too
    assert (run_dir / "metrics.json").read_text() == written.replace('"batch_size": 64', '"batch_size": 2')


def test_cli_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "old.json").write_text(json.dumps({"schema": "other", "conversations": []}))
    (tmp_path / "p.json").write_text(json.dumps(oracle_document()))
    cases = [
        ((), "predictions: missing; pass predictions=PATH"),
        ((f"predictions={tmp_path / 'nope.json'}",), f"{tmp_path / 'nope.json'}: no such file"),
        ((f"predictions={tmp_path / 'broken.json'}",), f"{tmp_path / 'broken.json'}: not JSON"),
        ((f"predictions={tmp_path / 'old.json'}",), "schema='other'; expected 'prospect.predictions/1'"),
        ((f"predictions={tmp_path / 'p.json'}", "eval=none"), "eval=none: scoring is disabled"),
        ((f"predictions={tmp_path / 'p.json'}", "eval=fancy"), "eval=fancy: unknown eval; choose one of: none, offline, proassist"),
        ((f"predictions={tmp_path / 'p.json'}", "eval.threshold=1"), "eval.threshold=1: unknown key"),
        ((f"predictions={tmp_path / 'p.json'}", "+eval.sentence_modle=x"), "eval.sentence_modle: unknown key (did you mean sentence_model?)"),
        ((f"predictions={tmp_path / 'p.json'}", "+eval._target_=os.system"), "eval._target_: unknown key; eval has: name, sentence_model"),
        ((f"predictions={tmp_path / 'p.json'}", "+predictons=x"), "predictons: unknown key (did you mean predictions?); the config has: predictions, eval"),
        ((f"predictions={tmp_path / 'p.json'}", "eval.match_threshold=2"), "eval.match_threshold=2: must be in [0.0, 1.0]"),
        ((f"predictions={tmp_path / 'p.json'}", "eval.sentence_model=/nonexistent/m"), "eval.sentence_model=/nonexistent/m: no such directory"),
    ]
    for args, expected in cases:
        assert run_cli(monkeypatch, *args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("prospect.evaluate: error: ") and expected in err[0], (args, err)
    assert not (tmp_path / "metrics.json").exists()


def test_cli_module_entry_point_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "prospect.evaluate", f"predictions={tmp_path / 'missing.json'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"prospect.evaluate: error: {tmp_path / 'missing.json'}: no such file"]


def test_each_distinct_text_is_embedded_once_in_sorted_order():
    from prospect.eval.embeddings import embed_texts

    model = EvalSettings().sentence_model
    first = embed_texts(["b text", "a text", "b text"], model, batch_size=1)
    again = embed_texts(["a text", "b text"], model, batch_size=1)
    assert list(first) == ["a text", "b text"]
    assert all(np.array_equal(first[t], again[t]) for t in first)
    assert all(abs(np.linalg.norm(v) - 1.0) < 1e-12 for v in first.values())
