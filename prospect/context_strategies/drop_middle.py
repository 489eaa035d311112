from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prospect.cache import cache_length
from prospect.context_strategies.base import BaseContextStrategy, check_last_keep_len


@dataclass
class DropMiddle(BaseContextStrategy):
    """`drop_middle` (ProAssist DROP_MIDDLE): over the threshold, keep the initial cache (everything up to
    the frame of the first user turn, the knowledge and its reply) and the last `last_keep_len` tokens;
    drop the middle. Before an initial cache exists, drop everything (as ProAssist).

    last_keep_len: recent tokens kept (ProAssist: 512).
    """

    last_keep_len: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        check_last_keep_len(self)

    @property
    def name(self) -> str:
        return "drop_middle"

    def handle_overflow(self, past_key_values: Any, last_msg, **context: Any):
        if self.init_kv_cache is None:
            self.keep(past_key_values, [])
            return past_key_values, last_msg
        length = cache_length(past_key_values)
        start = max(length - self.last_keep_len, self.init_len)
        self.keep(past_key_values, [(0, self.init_len), (start, length)])
        return past_key_values, last_msg
