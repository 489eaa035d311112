"""The end-of-run summary printed to the console."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def console_summary(strategy: str, status: str, error: str | None, metrics: dict, results: Sequence[Any], output_dir: Path) -> str:
    """The end-of-run summary in the seed's shape."""
    lines = [f"Strategy {strategy} {'completed' if status == 'ok' else 'FAILED: ' + str(error)}"]
    lines.append(f"  Generated: {metrics.get('dialogues_generated', 0)}")
    if "f1" in metrics:
        lines.append(f"  Matched: {metrics.get('dialogues_matched', 0)}")
        lines.append(f"  Precision: {metrics['precision']:.4f}  Recall: {metrics['recall']:.4f}  F1: {metrics['f1']:.4f}")
    reductions = [red for r in results for rec in r.trace for red in rec.get("reductions", [])]
    if reductions:
        before = sum(r["before"] for r in reductions) / len(reductions)
        after = sum(r["after"] for r in reductions) / len(reductions)
        lines.append(f"  Cache compression: {before:.0f}->{after:.0f} tokens (mean of {len(reductions)} reductions)")
    if "ref_ppl" in metrics:
        lines.append(f"  Reference replies (teacher-forced): perplexity {metrics['ref_ppl']:.3f}, top-1 {metrics['ref_top1']:.3f}, "
                     f"NLL per turn {metrics['ref_nll']:.2f} over {metrics['ref_turns']} turns")
    if "speak_auc" in metrics:
        lines.append(f"  Speak timing: AUC {metrics['speak_auc']:.3f}, P(speak) {metrics['speak_prob_due']:.3f} where a reference "
                     f"is due, {metrics['speak_prob_not_due']:.3f} elsewhere")
    lines.append(f"  Time/frame: {metrics.get('time_per_frame', 0):.3f} s (p95 {metrics.get('time_per_frame_p95', 0):.3f} s)")
    lines.append(f"  Peak memory: {metrics.get('peak_memory_mb', 0):.1f} MB")
    lines.append(f"  Files: {output_dir}")
    return "\n".join(lines)
