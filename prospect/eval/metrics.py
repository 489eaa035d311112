"""ProAssist's dialogue metrics: the names (defined here once) and micro-averaging of outcome counts.

With M = correct pairs (matched with score > match_threshold), M_all = all matched pairs, Miss and
Red the missed references and redundant generations, summed over conversations first:

    precision = M / (M_all + Red)            recall = M / (M_all + Miss)
    f1 = 2PR / (P + R)                       jaccard_index = M / (M_all + Miss + Red)
    missing_rate = Miss / (M_all + Miss)     redundant_rate = Red / (M_all + Red)
    semantic_score = mean score of matched pairs with score >= match_threshold (ProAssist's >=)
    time_diff = mean |i - j| / fps over correct pairs (seconds)

Every ratio or mean with a zero denominator (nothing to count) is 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prospect.eval.matching import MatchResult

PRECISION = "precision"
RECALL = "recall"
F1 = "f1"
JACCARD_INDEX = "jaccard_index"
MISSING_RATE = "missing_rate"
REDUNDANT_RATE = "redundant_rate"
SEMANTIC_SCORE = "semantic_score"
TIME_DIFF = "time_diff"
NUM_MATCHED = "num_matched"  # correct pairs (ProAssist's name)
NUM_MISMATCHED = "num_mismatched"  # matched pairs with score <= match_threshold
NUM_MISSED = "num_missed"
NUM_REDUNDANT = "num_redundant"
NUM_GENERATED = "num_generated"  # frames where the model spoke
NUM_REFERENCES = "num_references"  # frames that carry a reference
NUM_CONVERSATIONS = "num_conversations"  # pooled levels only (per subset, overall)

RATE_METRICS = (PRECISION, RECALL, F1, JACCARD_INDEX, MISSING_RATE, REDUNDANT_RATE, SEMANTIC_SCORE, TIME_DIFF)
COUNT_METRICS = (NUM_MATCHED, NUM_MISMATCHED, NUM_MISSED, NUM_REDUNDANT, NUM_GENERATED, NUM_REFERENCES)
METRIC_NAMES = RATE_METRICS + COUNT_METRICS

# Optional corpus-level NLG scores on correct pairs (eval.nlg_metrics); METEOR needs java.
BLEU = tuple(f"Bleu_{n}" for n in range(1, 5))
CIDER = "CIDEr"
METEOR = "METEOR"
NLG_METRICS = BLEU + (CIDER, METEOR)
WEIGHTED_SUFFIX = "_w"  # ProAssist's weighted variant: name_w = jaccard_index * name


def weighted_name(name: str) -> str:
    return name + WEIGHTED_SUFFIX


@dataclass
class Tally:
    """Outcome counts of one or more conversations (see `pool`)."""

    correct: int = 0
    mismatched: int = 0
    missed: int = 0
    redundant: int = 0
    generated: int = 0
    references: int = 0
    conversations: int = 0
    kept_scores: list[float] = field(default_factory=list)  # matched scores >= threshold
    time_diffs: list[float] = field(default_factory=list)  # seconds, correct pairs
    correct_pairs: list[tuple[str, str]] = field(default_factory=list)  # (gen, ref) texts, for NLG

    @classmethod
    def from_match(cls, result: MatchResult, threshold: float, fps: float) -> Tally:
        """Classify one conversation's matched pairs: correct iff score > threshold (strict)."""
        tally = cls(
            missed=len(result.missed), redundant=len(result.redundant),
            generated=result.num_generated, references=result.num_references, conversations=1,
        )
        for pair in result.matched:
            if pair.score >= threshold:
                tally.kept_scores.append(pair.score)
            if pair.score > threshold:
                tally.correct += 1
                tally.time_diffs.append(abs(pair.gen_frame - pair.ref_frame) / fps)
                tally.correct_pairs.append((pair.gen, pair.ref))
            else:
                tally.mismatched += 1
        return tally


def pool(tallies: Iterable[Tally]) -> Tally:
    """The sum of tallies (micro-averaging: counts add up, ratios come after)."""
    total = Tally()
    for tally in tallies:
        for name in ("correct", "mismatched", "missed", "redundant", "generated", "references", "conversations"):
            setattr(total, name, getattr(total, name) + getattr(tally, name))
        total.kept_scores.extend(tally.kept_scores)
        total.time_diffs.extend(tally.time_diffs)
        total.correct_pairs.extend(tally.correct_pairs)
    return total


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(tally: Tally) -> dict[str, float | int]:
    """The metrics of a (pooled) tally, keyed by METRIC_NAMES; zero denominators give 0."""
    matched_all = tally.correct + tally.mismatched
    precision = _ratio(tally.correct, matched_all + tally.redundant)
    recall = _ratio(tally.correct, matched_all + tally.missed)
    return {
        PRECISION: precision,
        RECALL: recall,
        F1: _ratio(2 * precision * recall, precision + recall),
        JACCARD_INDEX: _ratio(tally.correct, matched_all + tally.missed + tally.redundant),
        MISSING_RATE: _ratio(tally.missed, matched_all + tally.missed),
        REDUNDANT_RATE: _ratio(tally.redundant, matched_all + tally.redundant),
        SEMANTIC_SCORE: _mean(tally.kept_scores),
        TIME_DIFF: _mean(tally.time_diffs),
        NUM_MATCHED: tally.correct,
        NUM_MISMATCHED: tally.mismatched,
        NUM_MISSED: tally.missed,
        NUM_REDUNDANT: tally.redundant,
        NUM_GENERATED: tally.generated,
        NUM_REFERENCES: tally.references,
    }


def with_nlg(metrics: dict, scores: dict[str, float]) -> dict:
    """Add NLG scores and their weighted variants (name_w = jaccard_index * name)."""
    out = dict(metrics)
    for name, value in scores.items():
        out[name] = value
        out[weighted_name(name)] = metrics[JACCARD_INDEX] * value
    return out
