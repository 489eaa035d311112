"""Sweeps: the result cache (job key), end-of-sweep aggregation (`prospect.report`), launchers."""

from __future__ import annotations

from pathlib import Path


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group every job of one sweep shares: the sweep folder's last two parts (date_time)."""
    path = Path(sweep_dir)
    return f"{path.parent.name}_{path.name}" if path.parent.name else path.name
