"""Confidence intervals over conversations, and paired differences between two jobs.

A run's metrics pool its conversations (F1 from summed counts, ref_ppl from summed NLL and tokens, ...).
Their uncertainty comes from which conversations were drawn, so the interval resamples conversations:
each metric is written as a function of additive per-conversation parts (`POOLED`: the pooling rule,
of `AGGREGATES`, that its declaration in prospect.eval.per_run_metrics names), and
`scipy.stats.bootstrap` (BCa, CONFIDENCE, RESAMPLES, seeded with SEED: the same rows give the same
interval) recomputes the pooled metric on every resample. A paired difference between two jobs resamples
the conversations both ran (matched by id) and recomputes `metric(A) - metric(B)` on each: the
conversation-to-conversation variation that both jobs share cancels, so a smaller difference is visible.

When BCa cannot be computed (every resample gives one value, e.g. identical jobs) the percentile interval
is given. Fewer than 2 conversations give no interval, and say so. Metrics that are maxima over the run
(max_cache_size, kv_cache_peak_mb, peak_memory_mb) or totals (counts) have none: they do not average over
conversations. cache_frame_share has none either: its per-conversation rows do not tell how many frames
its mean covers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

import prospect.eval.stream_scores as s
from prospect.eval.metrics import NUM_MATCHED, NUM_MISMATCHED, NUM_MISSED, NUM_REDUNDANT
from prospect.eval.per_run_metrics import BY_NAME, INTERVAL_METRICS

CONFIDENCE = 0.95
RESAMPLES = 9999
SEED = 0
BATCH = 1000  # resamples per vectorized call (bounds memory with many conversations)

Row = Mapping[str, Any]


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (the metrics' convention)."""
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, 0.0)


def _counts(row: Row) -> tuple[float, ...] | None:
    if NUM_MATCHED not in row:
        return None
    return tuple(float(row[key]) for key in (NUM_MATCHED, NUM_MISMATCHED, NUM_MISSED, NUM_REDUNDANT))


def _f1(parts: np.ndarray) -> np.ndarray:
    correct, mismatched, missed, redundant = np.moveaxis(parts, -1, 0)
    precision = _ratio(correct, correct + mismatched + redundant)
    recall = _ratio(correct, correct + mismatched + missed)
    return _ratio(2 * precision * recall, precision + recall)


def _counts_ratio(numerator: Callable, denominator: Callable) -> Callable[[np.ndarray], np.ndarray]:
    def value(parts: np.ndarray) -> np.ndarray:
        counts = np.moveaxis(parts, -1, 0)
        return _ratio(numerator(*counts), denominator(*counts))

    return value


def _weighted(value_key: str, weight_key: str) -> Callable[[Row], tuple[float, float] | None]:
    """Parts (value x weight, weight) of a mean over `weight_key` items."""
    def parts(row: Row) -> tuple[float, float] | None:
        if value_key not in row or not row.get(weight_key):
            return None
        return float(row[value_key]) * float(row[weight_key]), float(row[weight_key])

    return parts


def _mean_of_parts(parts: np.ndarray) -> np.ndarray:
    return _ratio(parts[..., 0], parts[..., 1])


def _reference_token_parts(row: Row) -> tuple[float, float] | None:
    """Parts (summed NLL, tokens) of the reference tokens' perplexity (ref_nll is a mean over turns)."""
    return (float(row[s.REF_NLL]) * row[s.REF_TURNS], float(row[s.REF_TOKENS])) if row.get(s.REF_TURNS) else None


@dataclass(frozen=True)
class PooledMetric:
    """A run metric as a function of summed per-conversation parts. `parts(row)`: the conversation's additive
    parts (None when the row lacks the metric); `value(sums)`: the metric from parts summed over conversations
    (vectorized over leading axes)."""

    name: str
    parts: Callable[[Row], tuple[float, ...] | None]
    value: Callable[[np.ndarray], np.ndarray]


def _of_counts(value: Callable[[np.ndarray], np.ndarray]) -> Callable[[str], PooledMetric]:
    return lambda name: PooledMetric(name, _counts, value)


def _mean_per(weight_key: str) -> Callable[[str], PooledMetric]:
    return lambda name: PooledMetric(name, _weighted(name, weight_key), _mean_of_parts)


def _mean_per_conversation(name: str) -> PooledMetric:
    return PooledMetric(name, lambda row: (float(row[name]), 1.0) if name in row else None, _mean_of_parts)


# The pooling rules a declared metric's `aggregate` names (prospect.eval.per_run_metrics): each makes the
# metric's PooledMetric from its name.
AGGREGATES: dict[str, Callable[[str], PooledMetric]] = {
    "f1_of_counts": _of_counts(_f1),
    "precision_of_counts": _of_counts(_counts_ratio(lambda c, m, mi, r: c, lambda c, m, mi, r: c + m + r)),
    "recall_of_counts": _of_counts(_counts_ratio(lambda c, m, mi, r: c, lambda c, m, mi, r: c + m + mi)),
    "jaccard_index_of_counts": _of_counts(_counts_ratio(lambda c, m, mi, r: c, lambda c, m, mi, r: c + m + mi + r)),
    "missing_rate_of_counts": _of_counts(_counts_ratio(lambda c, m, mi, r: mi, lambda c, m, mi, r: c + m + mi)),
    "redundant_rate_of_counts": _of_counts(_counts_ratio(lambda c, m, mi, r: r, lambda c, m, mi, r: c + m + r)),
    "mean_per_matched_turn": _mean_per(NUM_MATCHED),
    "mean_per_reference_turn": _mean_per(s.REF_TURNS),
    "perplexity_per_reference_token": lambda name: PooledMetric(name, _reference_token_parts,
                                                                lambda parts: np.exp(_mean_of_parts(parts))),
    "mean_per_conversation": _mean_per_conversation,
    "mean_per_due_frame": _mean_per(s.SPEAK_FRAMES_DUE),
    "mean_per_not_due_frame": _mean_per(s.SPEAK_FRAMES_NOT_DUE),
    "mean_per_frame": _mean_per("frames_processed"),
}
POOLED = {name: AGGREGATES[BY_NAME[name].aggregate](name) for name in INTERVAL_METRICS}


def _usable(rows: Mapping[str, Row], metric: PooledMetric) -> dict[str, tuple[float, ...]]:
    """{conversation id: parts} of the rows that carry the metric (failed conversations never count)."""
    parts = {}
    for conversation, row in rows.items():
        if isinstance(row, Mapping) and not row.get("error"):
            value = metric.parts(row)
            if value is not None:
                parts[conversation] = value
    return parts


def _bootstrap(statistic: Callable[[np.ndarray], np.ndarray], count: int) -> tuple[float, float, str]:
    """(low, high, method) of `statistic(indices)` over resampled conversation indices 0..count-1."""
    from scipy.stats import bootstrap  # lazy: scipy.stats costs ~1.5 s at start-up; only when an interval is computed

    def on_indices(sample: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(np.moveaxis(np.asarray(sample), axis, -1))

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = bootstrap((np.arange(count),), on_indices, n_resamples=RESAMPLES, batch=BATCH, vectorized=True,
                               confidence_level=CONFIDENCE, method=method, rng=np.random.default_rng(SEED))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if np.isfinite(low) and np.isfinite(high):
            return low, high, method
    return float("nan"), float("nan"), "none"


def _summed(parts: np.ndarray, metric: PooledMetric) -> Callable[[np.ndarray], np.ndarray]:
    return lambda indices: metric.value(parts[indices].sum(axis=-2))


def interval(rows: Mapping[str, Row], name: str) -> dict[str, Any] | None:
    """The interval of run metric `name` over the conversations of `rows` ({id: per-conversation row}):
    {"low", "high", "conversations", "method", "confidence"}, or {"conversations", "reason"} when it cannot be
    given; None when no row carries the metric."""
    metric = POOLED[name]
    usable = _usable(rows, metric)
    if not usable:
        return None
    if len(usable) < 2:
        return {"conversations": len(usable), "reason": "one conversation: no interval over conversations"}
    parts = np.array(list(usable.values()), dtype=float)
    low, high, method = _bootstrap(_summed(parts, metric), len(usable))
    return {"low": low, "high": high, "conversations": len(usable), "method": method, "confidence": CONFIDENCE}


def intervals(rows: Mapping[str, Row], names: tuple[str, ...] = INTERVAL_METRICS) -> dict[str, dict[str, Any]]:
    """interval() of each metric some row carries."""
    found = {name: interval(rows, name) for name in names}
    return {name: value for name, value in found.items() if value is not None}


def paired_difference(rows: Mapping[str, Row], baseline: Mapping[str, Row], name: str) -> dict[str, Any] | None:
    """metric(rows) - metric(baseline) over the conversations both jobs ran, paired by conversation id:
    {"difference", "low", "high", "excludes_zero", "conversations", "method", "confidence"}, or
    {"reason", ...} when the jobs ran different conversations or fewer than 2 pair; None when either lacks the
    metric. Jobs over the same conversations where some conversation failed (or lacks the metric) in one of
    them are paired over the others, and "note" says how many were left out."""
    metric = POOLED[name]
    mine, theirs = _usable(rows, metric), _usable(baseline, metric)
    if not mine or not theirs:
        return None
    if set(rows) != set(baseline):
        only_mine, only_theirs = len(set(rows) - set(baseline)), len(set(baseline) - set(rows))
        return {"reason": f"not paired: the jobs ran different conversations ({only_mine} only in this job, "
                          f"{only_theirs} only in the baseline)"}
    ids = sorted(set(mine) & set(theirs))
    left_out = len(rows) - len(ids)
    note = {"note": f"{left_out} of {len(rows)} conversations left out: failed or without {name} in one of the jobs"} if left_out else {}
    if not ids:
        return {"reason": f"not paired: no conversation has {name} in both jobs", **note}
    a = np.array([mine[i] for i in ids], dtype=float)
    b = np.array([theirs[i] for i in ids], dtype=float)
    difference = float(metric.value(a.sum(axis=0)) - metric.value(b.sum(axis=0)))
    if len(ids) < 2:
        return {"difference": difference, "conversations": len(ids), "reason": "one conversation: no interval over conversations", **note}
    low, high, method = _bootstrap(lambda idx: metric.value(a[idx].sum(axis=-2)) - metric.value(b[idx].sum(axis=-2)), len(ids))
    return {"difference": difference, "low": low, "high": high, "excludes_zero": bool(low > 0 or high < 0),
            "conversations": len(ids), "method": method, "confidence": CONFIDENCE, **note}


def interval_summary(found: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Intervals as flat keys for a W&B summary: {metric}_ci_low, {metric}_ci_high (metrics with an interval)."""
    flat = {}
    for name, value in found.items():
        if "low" in value:
            flat[f"{name}_ci_low"], flat[f"{name}_ci_high"] = value["low"], value["high"]
    return flat
