"""The per-run metrics that outputs list, declared once (stdlib only: cheap to import anywhere).

A run's results.json carries more metrics than these (outcome counts, sizes, ...): each is written by its
computation (tracking.results.stream_metrics, eval.metrics.summarize, eval.stream_scores.pool). A metric is
declared here when an output lists it or formats it:

- results.json's and W&B's intervals over conversations: every metric with an `aggregate`, the name of its
  pooling rule in eval.intervals.AGGREGATES (INTERVAL_METRICS);
- the sweep summary (summary.md, summary.csv, prospect.report): a column per `summary_column` metric
  (SUMMARY_METRICS), with its interval where it has an aggregate (SHOWN_WITH_INTERVALS), and the paired
  difference against the baseline for each `difference` metric (DIFFERENCE_METRICS);
- the console summary: `fmt` formats the metric in the seed-shaped lines that name it, and a metric with a
  `console` label gets a line of its own.

Adding a metric: compute it (per run and per conversation, so that it can have an interval), then declare it
in PER_RUN_METRICS; its place there is its column's place in the sweep summary.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One per-run metric (a key of results.json's "metrics" and of its per-conversation rows).

    aggregate: how its per-conversation values pool into the run's value, the name of a rule of
      eval.intervals.AGGREGATES; a metric with one has a 95% bootstrap interval over conversations. None for
      maxima over the run and totals, which do not average over conversations.
    higher_is_better: its direction (None: neither, e.g. a count); the summary's paired differences and
      pareto.png's Pareto fronts read it.
    fmt: its format spec in the console summary.
    summary_column: a column of the sweep summary.
    difference: paired against the baseline in the sweep summary (needs an aggregate).
    console: the label of a console summary line of its own ("": none, or the seed's lines show it).
    """

    name: str
    aggregate: str | None = None
    higher_is_better: bool | None = None
    fmt: str = ".4g"
    summary_column: bool = False
    difference: bool = False
    console: str = ""

    def __post_init__(self) -> None:
        if self.difference and self.aggregate is None:
            raise ValueError(f"{self.name}: a paired difference needs an aggregate (a pooling rule)")

    @property
    def interval(self) -> bool:
        """Whether it gets an interval over conversations."""
        return self.aggregate is not None


_COLUMN = {"summary_column": True}
_PAIRED = {"summary_column": True, "difference": True}

# In the order of the sweep summary's columns; a metric that is no column sits beside its kin.
PER_RUN_METRICS = (
    Metric("dialogues_generated", fmt=""),
    Metric("dialogues_matched", fmt=""),
    Metric("f1", "f1_of_counts", True, ".4f", **_PAIRED),
    Metric("precision", "precision_of_counts", True, ".4f", **_COLUMN),
    Metric("recall", "recall_of_counts", True, ".4f", **_COLUMN),
    Metric("jaccard_index", "jaccard_index_of_counts", True),
    Metric("missing_rate", "missing_rate_of_counts", False),
    Metric("redundant_rate", "redundant_rate_of_counts", False),
    Metric("time_diff", "mean_per_matched_turn", False, **_COLUMN),
    Metric("ref_ppl", "perplexity_per_reference_token", False, ".3f", **_PAIRED),
    Metric("ref_nll", "mean_per_reference_turn", False, ".2f", **_PAIRED),
    Metric("ref_top1", "mean_per_reference_turn", True, ".3f", **_PAIRED),
    Metric("ref_turns", fmt=""),
    Metric("speak_auc", "mean_per_conversation", True, ".3f", **_PAIRED),
    Metric("speak_prob_due", "mean_per_due_frame", True, ".3f"),
    Metric("speak_prob_not_due", "mean_per_not_due_frame", False, ".3f"),
    Metric("peak_memory_mb", None, False, ".1f", **_COLUMN),
    Metric("kv_cache_peak_mb", None, False, **_COLUMN),
    Metric("time_per_frame", "mean_per_frame", False, ".3f", **_COLUMN),
    Metric("time_per_frame_p95", None, False, ".3f"),
    Metric("avg_cache_size", "mean_per_frame", False, **_COLUMN),
    Metric("max_cache_size", None, False, **_COLUMN),
    Metric("cache_compressions", **_COLUMN),
)
BY_NAME: Mapping[str, Metric] = {metric.name: metric for metric in PER_RUN_METRICS}

# Intervals are listed in an order older than the summary's columns, kept so that outputs do not change: these
# metrics' intervals follow another's in results.json, W&B and the sweep summary (its `intervals_note`) ...
INTERVALS_LISTED_AFTER = {"time_per_frame": "avg_cache_size"}
# ... and these in results.json and W&B only.
RESULTS_INTERVALS_LISTED_AFTER = {"ref_ppl": "ref_top1"}


def _listed(metrics: Iterable[Metric], after: Mapping[str, str]) -> tuple[str, ...]:
    """The metrics' names in declaration order, each of `after` moved to just behind the metric it names."""
    names = [metric.name for metric in metrics]
    for name, anchor in after.items():
        if name in names and anchor in names:
            names.remove(name)
            names.insert(names.index(anchor) + 1, name)
    return tuple(names)


SUMMARY_METRICS = tuple(metric.name for metric in PER_RUN_METRICS if metric.summary_column)
SHOWN_WITH_INTERVALS = _listed((m for m in PER_RUN_METRICS if m.summary_column and m.interval), INTERVALS_LISTED_AFTER)
DIFFERENCE_METRICS = tuple(metric.name for metric in PER_RUN_METRICS if metric.difference)
INTERVAL_METRICS = _listed((m for m in PER_RUN_METRICS if m.interval), {**INTERVALS_LISTED_AFTER, **RESULTS_INTERVALS_LISTED_AFTER})

