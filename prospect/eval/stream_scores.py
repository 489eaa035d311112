"""Scores the stream measured itself, without changing it: teacher-forced reference scores and the
probability of speaking at each frame (prospect.stream.runner records both; predictions.json carries them).

Per conversation, from its predictions entry:

    ref_turns, ref_tokens     reference replies scored, and their tokens
    ref_nll                   mean over turns of the turn's summed negative log-likelihood (nats)
    ref_ppl                   exp(sum of NLL / sum of tokens): perplexity of the reference tokens
    ref_top1                  mean over turns of the fraction of a turn's tokens that are the argmax
    ref_truncated_turns       turns scored on their first tokens only (the reply was longer than the room
                              left in the cache): their summed NLL covers fewer tokens
    speak_auc                 ROC AUC of P(speak) with the fed frames where a reference is due as positives
                              (Mann-Whitney U / (n_due * n_not_due); ties count one half); absent unless
                              the conversation has probed frames of both kinds
    speak_prob_due, speak_prob_not_due    mean P(speak) on those frames
    speak_frames_due, speak_frames_not_due  how many frames were probed of each kind

Per run (`pool`): sums over conversations for the counts; ref_nll, ref_ppl, ref_top1 and the speak
probabilities are pooled over all turns / frames of all conversations (as F1 pools its counts), while
speak_auc is the mean of the conversations' AUCs (`speak_auc_conversations` of them): each conversation's
frames are ranked on their own, since a model's overall talkativeness differs between videos.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from prospect.stream.frame_record import SPEAK_FIELD


REF_TURNS = "ref_turns"
REF_TOKENS = "ref_tokens"
REF_NLL = "ref_nll"
REF_PPL = "ref_ppl"
REF_TOP1 = "ref_top1"
REF_TRUNCATED_TURNS = "ref_truncated_turns"
SPEAK_AUC = "speak_auc"
SPEAK_AUC_CONVERSATIONS = "speak_auc_conversations"  # pooled levels only
SPEAK_PROB_DUE = "speak_prob_due"
SPEAK_PROB_NOT_DUE = "speak_prob_not_due"
SPEAK_FRAMES_DUE = "speak_frames_due"
SPEAK_FRAMES_NOT_DUE = "speak_frames_not_due"

REFERENCE_METRICS = (REF_NLL, REF_PPL, REF_TOP1, REF_TURNS, REF_TOKENS, REF_TRUNCATED_TURNS)
SPEAK_METRICS = (SPEAK_AUC, SPEAK_PROB_DUE, SPEAK_PROB_NOT_DUE, SPEAK_FRAMES_DUE, SPEAK_FRAMES_NOT_DUE)
STREAM_SCORE_METRICS = REFERENCE_METRICS + SPEAK_METRICS


def speak_auc(due: Iterable[float], not_due: Iterable[float]) -> float | None:
    """ROC AUC of scores with `due` as positives: scipy's Mann-Whitney U of (due, not_due) / (n_due * n_not_due);
    None without scores of both kinds."""
    due, not_due = list(due), list(not_due)
    if not due or not not_due:
        return None
    from scipy.stats import mannwhitneyu  # lazy: scipy.stats costs ~1.5 s at start-up; only when an AUC is computed

    statistic = mannwhitneyu(due, not_due, alternative="two-sided", method="asymptotic").statistic
    return float(statistic) / (len(due) * len(not_due))


def conversation_scores(conversation: Mapping[str, Any]) -> dict[str, float | int]:
    """The stream scores of one predictions entry (see the module docstring); {} when it carries none."""
    scores: dict[str, float | int] = {}
    turns = [frame for frame in conversation.get("frames", []) if "ref_nll" in frame]
    if turns:
        nll = sum(float(t["ref_nll"]) for t in turns)
        tokens = sum(int(t["ref_tokens"]) for t in turns)
        scores.update({
            REF_TURNS: len(turns), REF_TOKENS: tokens, REF_NLL: nll / len(turns),
            REF_PPL: math.exp(nll / tokens), REF_TOP1: sum(float(t["ref_top1"]) for t in turns) / len(turns),
            REF_TRUNCATED_TURNS: sum(bool(t.get("ref_truncated")) for t in turns),
        })
    speak = conversation.get(SPEAK_FIELD)
    if speak and speak.get("p"):
        due = [p for p, is_due in zip(speak["p"], speak["due"]) if is_due]
        not_due = [p for p, is_due in zip(speak["p"], speak["due"]) if not is_due]
        scores.update({SPEAK_FRAMES_DUE: len(due), SPEAK_FRAMES_NOT_DUE: len(not_due),
                       SPEAK_PROB_DUE: _mean(due), SPEAK_PROB_NOT_DUE: _mean(not_due)})
        auc = speak_auc(due, not_due)
        if auc is not None:
            scores[SPEAK_AUC] = auc
    return scores


def pool(rows: Iterable[Mapping[str, Any]]) -> dict[str, float | int]:
    """Run-level stream scores from per-conversation rows (conversation_scores); {} when none has any."""
    rows = list(rows)
    pooled: dict[str, float | int] = {}
    scored = [r for r in rows if r.get(REF_TURNS)]
    if scored:
        turns = sum(r[REF_TURNS] for r in scored)
        tokens = sum(r[REF_TOKENS] for r in scored)
        nll = sum(r[REF_NLL] * r[REF_TURNS] for r in scored)
        pooled.update({
            REF_TURNS: turns, REF_TOKENS: tokens, REF_NLL: nll / turns, REF_PPL: math.exp(nll / tokens),
            REF_TOP1: sum(r[REF_TOP1] * r[REF_TURNS] for r in scored) / turns,
            REF_TRUNCATED_TURNS: sum(r.get(REF_TRUNCATED_TURNS, 0) for r in scored),
        })
    probed = [r for r in rows if SPEAK_FRAMES_DUE in r]
    if probed:
        due = sum(r[SPEAK_FRAMES_DUE] for r in probed)
        not_due = sum(r[SPEAK_FRAMES_NOT_DUE] for r in probed)
        pooled.update({
            SPEAK_FRAMES_DUE: due, SPEAK_FRAMES_NOT_DUE: not_due,
            SPEAK_PROB_DUE: sum(r[SPEAK_PROB_DUE] * r[SPEAK_FRAMES_DUE] for r in probed) / due if due else 0.0,
            SPEAK_PROB_NOT_DUE: sum(r[SPEAK_PROB_NOT_DUE] * r[SPEAK_FRAMES_NOT_DUE] for r in probed) / not_due if not_due else 0.0,
        })
        aucs = [r[SPEAK_AUC] for r in probed if SPEAK_AUC in r]
        if aucs:
            pooled.update({SPEAK_AUC: sum(aucs) / len(aucs), SPEAK_AUC_CONVERSATIONS: len(aucs)})
    return pooled


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
