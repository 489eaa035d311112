from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prospect.context_strategies.base import BaseContextStrategy
from prospect.context_strategies.events import RESET


@dataclass
class NoContext(BaseContextStrategy):
    """`none`: stateless. After every frame step (and reply) the cache returns to the initial context:
    the system prompt, and once ProAssist's initial cache exists (up to the frame of the first user turn
    and the knowledge, with its reply) that cache. Nothing from later frames or turns persists; memory
    is constant (the seed's "each turn starts fresh"). Positions restart right after the initial context in
    every position mode, so a long video never runs positions up."""

    event = RESET

    @property
    def name(self) -> str:
        return "none"

    @property
    def base_len(self) -> int:
        return self.init_len if self.init_kv_cache is not None else self.prompt_len

    def should_reduce_cache(self, current_seq_len: int) -> bool:
        return current_seq_len > self.base_len

    def handle_overflow(self, past_key_values: Any, last_msg, **context: Any):
        self.keep(past_key_values, [(0, self.base_len)])
        past_key_values.next_position = self.base_len  # every step starts right after the initial context
        return past_key_values, None
