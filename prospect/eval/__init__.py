"""Evaluation: ProAssist's protocol over a predictions document (evaluation.py: `evaluate_predictions`,
`read_predictions`, `measured_scores`), matching, metrics, stream scores, bootstrap intervals and the per-run
metric declarations. docs/evaluation.md describes the protocol; docs/measurements.md the stream's scores.

The package itself is light: its modules load when used (`prospect.eval.config_checks` and
`prospect.eval.per_run_metrics` without scipy or sentence-transformers), and the names of evaluation.py are
served from here on first use.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """Lazy: evaluation.py (scipy, the sentence model's code) loads when one of its names is first used."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module("prospect.eval.evaluation"), name)
