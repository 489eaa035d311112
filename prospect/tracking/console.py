"""The end-of-run summary printed to the console."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prospect.eval.per_run_metrics import BY_NAME, PER_RUN_METRICS

_REQUIRED = object()


def _text(metrics: Mapping[str, Any], name: str, default: Any = _REQUIRED) -> str:
    """A metric as its declaration formats it (prospect.eval.per_run_metrics); `default` where it is absent."""
    value = metrics[name] if default is _REQUIRED else metrics.get(name, default)
    return format(value, BY_NAME[name].fmt)


def console_summary(strategy: str, status: str, error: str | None, metrics: dict, results: Sequence[Any], output_dir: Path) -> str:
    """The end-of-run summary in the seed's shape, then a line for each metric declared with a `console` label."""
    lines = [f"Strategy {strategy} {'completed' if status == 'ok' else 'FAILED: ' + str(error)}"]
    lines.append(f"  Generated: {_text(metrics, 'dialogues_generated', 0)}")
    if "f1" in metrics:
        lines.append(f"  Matched: {_text(metrics, 'dialogues_matched', 0)}")
        lines.append(f"  Precision: {_text(metrics, 'precision')}  Recall: {_text(metrics, 'recall')}  F1: {_text(metrics, 'f1')}")
    reductions = [red for r in results for rec in r.trace for red in rec.get("reductions", [])]
    if reductions:
        before = sum(r["before"] for r in reductions) / len(reductions)
        after = sum(r["after"] for r in reductions) / len(reductions)
        lines.append(f"  Cache compression: {before:.0f}->{after:.0f} tokens (mean of {len(reductions)} reductions)")
    if "ref_ppl" in metrics:
        lines.append(f"  Reference replies (teacher-forced): perplexity {_text(metrics, 'ref_ppl')}, top-1 {_text(metrics, 'ref_top1')}, "
                     f"NLL per turn {_text(metrics, 'ref_nll')} over {_text(metrics, 'ref_turns')} turns")
    if "speak_auc" in metrics:
        lines.append(f"  Speak timing: AUC {_text(metrics, 'speak_auc')}, P(speak) {_text(metrics, 'speak_prob_due')} where a "
                     f"reference is due, {_text(metrics, 'speak_prob_not_due')} elsewhere")
    lines.append(f"  Time/frame: {_text(metrics, 'time_per_frame', 0)} s (p95 {_text(metrics, 'time_per_frame_p95', 0)} s)")
    lines.append(f"  Peak memory: {_text(metrics, 'peak_memory_mb', 0)} MB")
    lines += [f"  {metric.console}: {_text(metrics, metric.name)}" for metric in PER_RUN_METRICS if metric.console and metric.name in metrics]
    lines.append(f"  Files: {output_dir}")
    return "\n".join(lines)
