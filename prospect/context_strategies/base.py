"""The context-strategy interface (the seed's API) and the mechanics every strategy shares.

A strategy watches the cache length and, when asked, reduces the cache. ProAssist's threshold:
reduce once the cache holds `ctxlen_to_reduce = max_seq_len - reserved_seq_len` tokens (checked after
every frame step and every reply); independently, the runner never lets the cache exceed
`max_seq_len`: if the next chunk would not fit, it asks the strategy to reduce first.

Positions after eviction (`position_mode`; keys are cached after RoPE):
- original: new tokens continue at the running position counter; kept keys keep their positions.
- contiguous: kept keys are re-rotated to 0..len-1 and new tokens continue at len (StreamingLLM).
- cache_length: new tokens continue at the cache length, kept keys keep their positions (what
  ProAssist's code does implicitly: transformers derives positions from the cache length).
An emptied cache restarts at position 0 in every mode.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prospect.context_strategies.events import COMPRESS
from prospect.typed_fields import check_field_types
from prospect.cache import PositionedCache, cache_length, clone_cache, keep_spans, keep_tokens, make_contiguous

POSITION_MODES = ("original", "contiguous", "cache_length")


class ContextOverflowError(RuntimeError):
    """The next chunk cannot fit in the cache even after the strategy reduced it."""


@dataclass
class BaseContextStrategy(ABC):
    """Base of all context strategies; subclasses add their own parameters as dataclass fields.

    max_seq_len: tokens the cache may hold; reserved_seq_len: tokens kept free (the reduction threshold
    is max_seq_len - reserved_seq_len); position_mode: see the module docstring.
    """

    max_seq_len: int = 4096
    reserved_seq_len: int = 128
    position_mode: str = "original"

    # What the runner reads off every strategy (seed-style strategies get these defaults):
    event: ClassVar[str] = COMPRESS  # what a reduction is called in the trace (one of events.REDUCTION_EVENTS)
    records_queries: ClassVar[bool] = False  # the stream records each token's pre-RoPE queries for `score` (SnapKV)
    last_summary: ClassVar[str | None] = None  # a SUMMARY strategy sets it on itself: the summary its last reduction
    # decoded, which the trace records (a class default, not a field: it is no config key)
    bounded: ClassVar[bool] = True  # the cache never holds more than max_seq_len (the zoo compares these)

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len={self.max_seq_len}: must be >= 1")
        if not 0 <= self.reserved_seq_len < self.max_seq_len:
            raise ValueError(f"reserved_seq_len={self.reserved_seq_len}: must be in [0, max_seq_len={self.max_seq_len})")
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode={self.position_mode}: choose one of: {', '.join(POSITION_MODES)}")
        self.init_kv_cache: PositionedCache | None = None
        self.init_len = 0
        self.prompt_len = 0

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    def ctxlen_to_reduce(self) -> int:
        """Cache length (tokens) at which the strategy reduces."""
        return self.max_seq_len - self.reserved_seq_len

    def capacity(self, model_max_positions: int) -> int:
        """The most tokens the cache may ever hold under this strategy."""
        return self.max_seq_len

    def should_reduce_cache(self, current_seq_len: int) -> bool:
        return current_seq_len >= self.ctxlen_to_reduce

    def should_reduce(self, cache: PositionedCache) -> bool:
        """Whether to reduce now; the stream asks after every frame step. The seed's rule, by the cache length
        alone; a strategy that needs to see what the cache holds overrides this."""
        return self.should_reduce_cache(cache_length(cache))

    @abstractmethod
    def handle_overflow(self, past_key_values: Any, last_msg: list[int] | None, **context: Any) -> tuple[Any, list[int] | None]:
        """Reduce the cache. Returns (cache, last_msg): last_msg are token ids fed before the next chunk.

        context (from the runner): model, system_prompt, knowledge, encode_system_turn(text) -> ids,
        summarize(prompt, max_new_tokens) -> text, frame_index, time, capacity (tokens the cache may hold).
        """

    def planned_summary(self) -> tuple[str, int] | None:
        """The summary the next reduction will ask for with `summarize(prompt, max_new_tokens)`, as (prompt,
        max_new_tokens), or None. The stream decodes the summaries of the lanes that reduce at one point as one
        batch before their reductions run; a strategy that asks for no summary, or one it cannot plan, returns
        None (its summary, if any, is then decoded alone when it asks). A planned summary must be the reduction's
        first step on the cache, and asked for exactly as planned (the stream refuses otherwise)."""
        return None

    def start_stream(self, prompt_len: int) -> None:
        """A new conversation begins; the cache holds its system prompt (prompt_len tokens)."""
        self.init_kv_cache, self.init_len, self.prompt_len = None, 0, prompt_len

    def set_initial_cache(self, cache: PositionedCache) -> None:
        """ProAssist's initial cache: everything up to the frame of the first user turn (and its reply).

        Reductions keep it as the cache's prefix (init_len tokens); `init_kv_cache` is a copy kept in host
        memory for inspection (it costs no accelerator memory)."""
        self.init_kv_cache = clone_cache(cache, device="cpu")
        self.init_len = cache_length(cache)

    def keep(self, cache: PositionedCache, spans: list[tuple[int, int]]) -> None:
        """Keep [start, end) spans of the cache and apply position_mode."""
        keep_spans(cache, spans)
        self._apply_position_mode(cache)

    def keep_index(self, cache: PositionedCache, index: torch.Tensor) -> None:
        """Keep the tokens at `index` (ascending cache slots) and apply position_mode."""
        keep_tokens(cache, index)
        self._apply_position_mode(cache)

    def _apply_position_mode(self, cache: PositionedCache) -> None:
        length = cache_length(cache)
        if length == 0:
            cache.next_position = 0
        elif self.position_mode == "contiguous":
            make_contiguous(cache)
        elif self.position_mode == "cache_length":
            cache.next_position = length


def check_last_keep_len(strategy: Any, extra: int = 0, extra_name: str = "") -> None:
    """The rule of every strategy that keeps `last_keep_len` recent tokens (plus `extra`, e.g. sinks)."""
    value = strategy.last_keep_len
    if value < 0:
        raise ValueError(f"last_keep_len={value}: must be >= 0")
    total = value + extra + strategy.reserved_seq_len
    if total >= strategy.max_seq_len:
        what = f"last_keep_len + {extra_name} + reserved_seq_len" if extra_name else "last_keep_len + reserved_seq_len"
        raise ValueError(f"last_keep_len={value}: {what} ({total}) must be < max_seq_len ({strategy.max_seq_len})")
