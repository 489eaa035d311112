"""Intervals over conversations and paired differences (prospect/eval/intervals.py): the bootstrap is scipy's,
seeded, over conversations; pooled metrics are recomputed from additive parts on every resample."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import bootstrap

from prospect.eval.intervals import (
    AGGREGATES, CONFIDENCE, POOLED, RESAMPLES, SEED, interval, interval_summary, intervals, paired_difference,
)
from prospect.eval.metrics import METRIC_NAMES, Tally, pool, summarize
from prospect.eval.per_run_metrics import INTERVAL_METRICS, PER_RUN_METRICS, SHOWN_WITH_INTERVALS, SUMMARY_METRICS
from prospect.eval.stream_scores import STREAM_SCORE_METRICS
from prospect.tracking.results import stream_metrics


def rows_from(values: dict[str, dict]) -> dict[str, dict]:
    return {cid: dict(row) for cid, row in values.items()}


def test_a_mean_over_equal_weights_is_scipys_own_bootstrap_of_the_means():
    """With one frame-weighted mean and equal frame counts, the pooled metric is the mean of the conversations'
    values: the interval must be exactly scipy's BCa bootstrap of those values with the same seed."""
    values = np.random.default_rng(3).normal(0.4, 0.1, size=15)
    rows = {f"c{i}": {"time_per_frame": float(v), "frames_processed": 40} for i, v in enumerate(values)}
    found = interval(rows, "time_per_frame")
    expected = bootstrap((values,), np.mean, n_resamples=RESAMPLES, confidence_level=CONFIDENCE, method="BCa",
                         rng=np.random.default_rng(SEED)).confidence_interval
    assert found["method"] == "BCa" and found["conversations"] == 15
    assert found["low"] == pytest.approx(expected.low, rel=1e-9) and found["high"] == pytest.approx(expected.high, rel=1e-9)


def test_f1_resamples_pooled_counts_and_is_seeded():
    rng = np.random.default_rng(0)
    rows = {f"c{i}": {"num_matched": int(rng.integers(0, 6)), "num_mismatched": int(rng.integers(0, 4)),
                      "num_missed": int(rng.integers(0, 4)), "num_redundant": int(rng.integers(0, 3))} for i in range(12)}
    first, again = interval(rows, "f1"), interval(rows_from(rows), "f1")
    assert first == again  # the same rows give the same interval
    tallies = [Tally(correct=r["num_matched"], mismatched=r["num_mismatched"], missed=r["num_missed"], redundant=r["num_redundant"])
               for r in rows.values()]
    pooled_f1 = summarize(pool(tallies))["f1"]  # the run's micro-averaged F1 lies inside its interval
    assert first["low"] <= pooled_f1 <= first["high"] and first["high"] > first["low"]


def test_fewer_than_two_conversations_give_a_reason_not_a_zero_width_interval():
    one = {"c0": {"ref_nll": 3.0, "ref_turns": 2, "ref_tokens": 9, "ref_top1": 0.5}}
    found = intervals(one)
    assert set(found) == {"ref_nll", "ref_top1", "ref_ppl"}
    assert all("low" not in value and value["reason"].startswith("one conversation") for value in found.values())
    assert interval({"c0": {"error": "boom", "ref_nll": 1.0, "ref_turns": 1, "ref_tokens": 1}}, "ref_nll") is None  # failed: not counted


def test_paired_difference_pairs_by_conversation_id_and_marks_what_excludes_zero():
    rng = np.random.default_rng(1)
    base = {f"c{i}": {"ref_nll": float(rng.normal(40, 8)), "ref_turns": 4, "ref_tokens": 50} for i in range(10)}
    worse = {cid: {**row, "ref_nll": row["ref_nll"] + 2.0 + float(rng.normal(0, 0.3))} for cid, row in base.items()}
    shuffled = dict(reversed(list(worse.items())))  # order does not matter: ids pair the rows
    found = paired_difference(shuffled, base, "ref_nll")
    assert found["difference"] == pytest.approx(np.mean([worse[c]["ref_nll"] - base[c]["ref_nll"] for c in base]))
    assert found["excludes_zero"] and found["low"] > 0
    # unpaired, the conversation-to-conversation spread (sd 8) hides the 2-nat shift
    alone_worse, alone_base = interval(worse, "ref_nll"), interval(base, "ref_nll")
    assert alone_worse["low"] < alone_base["high"]
    same = paired_difference(base, base, "ref_nll")
    assert same["difference"] == 0.0 and not same["excludes_zero"]
    other = paired_difference({**base, "c99": base["c0"]}, base, "ref_nll")
    assert "low" not in other and other["reason"].startswith("not paired: the jobs ran different conversations (1 only in this job")
    assert paired_difference(base, {"c0": {"num_matched": 1}}, "ref_nll") is None
    # the same conversations, one failed in this job: paired over the other nine, and the note says so
    failed = {**worse, "c3": {"error": "RuntimeError: boom"}}
    partial = paired_difference(failed, base, "ref_nll")
    assert partial["conversations"] == 9 and partial["note"].startswith("1 of 10 conversations left out")
    assert partial["difference"] == pytest.approx(np.mean([worse[c]["ref_nll"] - base[c]["ref_nll"] for c in base if c != "c3"]))


def test_the_wandb_summary_gets_the_bounds_of_the_metrics_that_have_an_interval():
    rows = {f"c{i}": {"ref_nll": 10.0 + i, "ref_turns": 2, "ref_tokens": 20, "ref_top1": 0.5} for i in range(4)}
    found = {**intervals(rows), "f1": {"conversations": 1, "reason": "one conversation: no interval over conversations"}}
    flat = interval_summary(found)
    assert set(flat) == {f"{m}_ci_{end}" for m in ("ref_nll", "ref_top1", "ref_ppl") for end in ("low", "high")}
    assert (flat["ref_nll_ci_low"], flat["ref_nll_ci_high"]) == (found["ref_nll"]["low"], found["ref_nll"]["high"])


def test_every_declared_metric_is_computed_and_pools_by_a_known_rule():
    """prospect.eval.per_run_metrics declares only what a computation writes; each aggregate names a rule here."""
    record = {"events": ["frame"], "cache_after": 10, "wall_ms": 5.0}
    computed = set(stream_metrics([[record]], 0.0)) | set(METRIC_NAMES) | set(STREAM_SCORE_METRICS) | {"dialogues_matched"}
    assert {metric.name for metric in PER_RUN_METRICS} <= computed
    assert {metric.aggregate for metric in PER_RUN_METRICS if metric.aggregate} <= set(AGGREGATES)
    assert tuple(POOLED) == INTERVAL_METRICS and set(SHOWN_WITH_INTERVALS) == set(SUMMARY_METRICS) & set(INTERVAL_METRICS)
