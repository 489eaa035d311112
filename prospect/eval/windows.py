"""ProAssist's matching windows: how early or late a generation may be and still match a reference.

A window (left, right) allows a generation at frame i to match the reference at frame j when
left <= j - i <= right (left <= 0 <= right). This module is the single source of the window table.
"""

from __future__ import annotations

from collections.abc import Sequence

# (substring of the subset name, (left, right) seconds). The first entry whose substring occurs in
# the subset name wins, so the order matters (ProAssist's order).
SUBSET_WINDOWS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("narration", (-2.5, 2.5)),
    ("ego4d", (-4.0, 8.5)),
    ("epickitchens", (-1.5, 3.0)),
    ("holoassist", (-1.5, 2.5)),
    ("egoexolearn", (-2.0, 3.5)),
    ("assembly101", (-2.0, 4.0)),
    ("wtag", (-3.0, 6.0)),
)
DEFAULT_WINDOW: tuple[float, float] = (-2.5, 2.5)


def window_seconds(subset: str, override: Sequence[float] | None = None) -> tuple[float, float]:
    """(left, right) seconds for a subset: `override` when given, else the first table entry whose
    substring occurs in `subset` (case-insensitive), else DEFAULT_WINDOW."""
    if override is not None:
        left, right = override
        return float(left), float(right)
    name = subset.lower()
    for key, window in SUBSET_WINDOWS:
        if key in name:
            return window
    return DEFAULT_WINDOW


def window_frames(seconds: Sequence[float], fps: float) -> tuple[int, int]:
    """A window in frames: int(seconds * fps), truncated toward zero as ProAssist does.

    assembly101 at 2 fps: (-2.0, 4.0) s -> (-4, 8) frames; (-1.5, 2.5) s at 3 fps -> (-4, 7).
    """
    left, right = seconds
    return int(left * fps), int(right * fps)
