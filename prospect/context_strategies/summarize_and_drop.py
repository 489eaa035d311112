from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prospect.context_strategies.base import BaseContextStrategy
from prospect.context_strategies.events import SUMMARY


@dataclass
class SummarizeAndDrop(BaseContextStrategy):
    """`summarize_and_drop` (ProAssist SUMMARIZE_AND_DROP): over the threshold, ask `summary_prompt` as a
    system turn on top of the full cache and decode a summary greedily (at most summary_max_new_tokens),
    then empty the cache and restart from one new system turn "{initial system prompt} {summary}
    {knowledge}" (fed before the next chunk).

    So that the summary fits without the cache ever exceeding max_seq_len, the threshold leaves room for
    it: ctxlen_to_reduce = max_seq_len - reserved_seq_len - summary_max_new_tokens (ProAssist likewise
    reserves the summary's length when it prepares its training clips). The prompt uses the reserve.
    """

    summary_prompt: str = "Please summarize the progress."
    summary_max_new_tokens: int = 512

    event = SUMMARY

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.summary_max_new_tokens < self.max_seq_len - self.reserved_seq_len:
            raise ValueError(
                f"summary_max_new_tokens={self.summary_max_new_tokens}: must be >= 1 and < max_seq_len - reserved_seq_len"
            )
        self.last_summary = ""

    @property
    def name(self) -> str:
        return "summarize_and_drop"

    @property
    def ctxlen_to_reduce(self) -> int:
        return self.max_seq_len - self.reserved_seq_len - self.summary_max_new_tokens

    def planned_summary(self) -> tuple[str, int]:
        return self.summary_prompt, self.summary_max_new_tokens

    def handle_overflow(self, past_key_values: Any, last_msg, **context: Any):
        self.last_summary = context["summarize"](self.summary_prompt, self.summary_max_new_tokens)
        parts = (context.get("system_prompt", ""), self.last_summary, context.get("knowledge", ""))
        restart = " ".join(part for part in parts if part)
        self.keep(past_key_values, [])
        return past_key_values, context["encode_system_turn"](restart)
