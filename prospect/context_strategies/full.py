from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from prospect.cache import cache_length
from prospect.context_strategies.base import BaseContextStrategy, ContextOverflowError


@dataclass
class FullContext(BaseContextStrategy):
    """`full`: keep everything (the unbounded reference). max_seq_len does not apply; the cache may grow
    to the model's max positions, past which the run fails with a clear error."""

    bounded: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return "full"

    def capacity(self, model_max_positions: int) -> int:
        return model_max_positions

    def should_reduce_cache(self, current_seq_len: int) -> bool:
        return False

    def handle_overflow(self, past_key_values: Any, last_msg, **context: Any):
        limit = context.get("capacity", "?")
        raise ContextOverflowError(
            f"frame {context.get('frame_index', '?')}: strategy full keeps everything and the cache "
            f"({cache_length(past_key_values)} tokens) cannot grow past the model's max positions ({limit}); "
            f"use a shorter video or a reducing strategy"
        )
