from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prospect.context_strategies.base import BaseContextStrategy
from prospect.context_strategies.events import RESET


@dataclass
class DropAll(BaseContextStrategy):
    """`drop_all` (ProAssist DROP_ALL): over the threshold, empty the cache entirely (the system prompt
    and goal are lost too) and continue; positions restart at 0."""

    event = RESET

    @property
    def name(self) -> str:
        return "drop_all"

    def handle_overflow(self, past_key_values: Any, last_msg, **context: Any):
        self.keep(past_key_values, [])
        return past_key_values, last_msg
