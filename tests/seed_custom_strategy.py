"""A custom strategy written exactly like the seed's quick-start example (used by test_api.py)."""

from prospect.context_strategies import BaseContextStrategy


class KeepRecentHalf(BaseContextStrategy):
    def should_reduce_cache(self, current_seq_len: int) -> bool:
        """Decide when to compress"""
        return current_seq_len >= self.ctxlen_to_reduce

    def handle_overflow(self, past_key_values, last_msg, **context):
        """Keep the most recent half of a plain transformers cache (seed style: no positions)."""
        from transformers import DynamicCache

        compressed = DynamicCache()
        for index, (keys, values) in enumerate(past_key_values.layer_tensors()):
            half = keys.shape[2] // 2
            compressed.update(keys[:, :, half:].clone(), values[:, :, half:].clone(), index)
        return compressed, last_msg

    @property
    def name(self) -> str:
        return "custom"
