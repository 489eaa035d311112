"""The optimized language-model step: fixed shapes over the preallocated KV buffer, replayed as CUDA graphs.

The eager step (VisionLanguageModel.forward) attends over the cached tokens only, so every step has new
shapes and pays Python and kernel-launch overhead (on an H200 a 2.2B decode step costs 20-28 ms for ~1 ms
of GPU work). Here a chunk of n tokens always attends over the whole buffer of `capacity` slots with a
boolean mask (slot j is visible to chunk token i when j <= length + i), and its keys/values are written
with index_copy_ at slots length..length+n-1. Shapes then depend on n alone: on CUDA each chunk length
is captured once as a CUDA graph and replayed; elsewhere the same computation runs directly (which is
how the tests check, on CPU in fp32, that it reproduces the eager step).

The graphs are bound to one cache's buffers: use `cache()` (one PositionedCache per runner, reset between
conversations). Strategies reduce it in place (keep_spans / make_contiguous move data inside the buffers).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from transformers.cache_utils import Cache

from prospect.cache import PositionedCache, Provenance
from prospect.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)


class _SlotWriter(Cache):
    """The cache the model sees inside a static step: writes keys/values at `slots`, returns whole buffers."""

    def __init__(self, cache: PositionedCache, slots: torch.Tensor):
        super().__init__(layers=list(cache.layers))
        self.slots = slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        layer.key_buffer.index_copy_(2, self.slots, key_states)
        layer.value_buffer.index_copy_(2, self.slots, value_states)
        return layer.key_buffer, layer.value_buffer


class _Step:
    """Static inputs/outputs of one chunk shape (length, image or text-only), and its CUDA graph once captured.

    Positions, write slots and the mask are computed inside the step from two one-element tensors (the
    cache length and the first position), and a text-only chunk embeds its ids inside the step too, so a
    replay needs only a few small copies from the host."""

    def __init__(self, n: int, with_image: bool, hidden: int, device: torch.device, dtype: torch.dtype):
        self.n = n
        self.with_image = with_image
        self.ids = torch.zeros(1, n, dtype=torch.long, device=device)
        self.embeds = torch.zeros(1, n, hidden, device=device, dtype=dtype) if with_image else None
        self.start = torch.zeros(1, dtype=torch.long, device=device)  # cache length = first write slot
        self.first = torch.zeros(1, dtype=torch.long, device=device)  # position of the first token
        self.offsets = torch.arange(n, device=device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None


class StaticForward:
    """Drop-in for VisionLanguageModel.forward: same arguments, same results (up to float rounding).
    On CUDA the returned logits are the graph's output buffer: valid until the next call."""

    def __init__(
        self, model: VisionLanguageModel, capacity: int, use_graphs: bool | None = None, max_graphs: int = 48,
        record_queries: bool = False,
    ):
        self.model = model
        self.capacity = capacity
        self.record_queries = record_queries
        self.device = model.device
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.max_graphs = max_graphs
        self.steps: dict[tuple[int, bool, bool], _Step] = {}
        self.slot_index = torch.arange(capacity, device=self.device)
        self._cache: PositionedCache | None = None
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.graphs_captured = 0

    def cache(self) -> PositionedCache:
        """The one cache the graphs are bound to, emptied (call once per conversation)."""
        if self._cache is None:
            self._cache = self.model.new_cache(self.capacity, record_queries=self.record_queries)
            self.model.allocate(self._cache)
        self._cache.reset()
        return self._cache

    def _body(self, step: _Step, cache: PositionedCache, all_logits: bool) -> torch.Tensor:
        embeds = step.embeds if step.with_image else self.model.model.get_input_embeddings()(step.ids)
        slots = step.offsets + step.start
        positions = (step.offsets + step.first)[None]
        mask = (self.slot_index[None, :] <= slots[:, None])[None, None]  # slot j visible to token i: j <= length + i
        cache.write_slots = slots  # query recording (if on) writes here, inside the graph
        self.model.writing_cache = cache
        try:
            hidden = self.model.model.model.text_model(
                inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                past_key_values=_SlotWriter(cache, slots), use_cache=True,
            ).last_hidden_state
        finally:
            self.model.writing_cache = None
        hidden = hidden[0] if all_logits else hidden[0, -1]
        return self.model.model.lm_head(hidden).float()

    @torch.no_grad()
    def __call__(
        self,
        input_ids: Sequence[int],
        cache: PositionedCache,
        image_features: torch.Tensor | None = None,
        all_logits: bool = False,
        provenance: Provenance | None = None,
    ) -> torch.Tensor:
        if cache is not self._cache:
            raise ValueError("StaticForward runs on the cache from its cache() method only")
        ids = list(input_ids)
        n = len(ids)
        length = cache.get_seq_length()
        if length + n > self.capacity:
            raise RuntimeError(f"KV buffer full: {length} + {n} tokens > capacity {self.capacity}")
        with_image = image_features is not None or self.model.image_token_id in ids
        key = (n, all_logits, with_image)
        step = self.steps.get(key)
        if step is None:
            hidden = self.model.model.config.text_config.hidden_size
            step = self.steps[key] = _Step(n, with_image, hidden, self.device, self.model.dtype)
        if with_image:
            step.embeds.copy_(self.model.embed(ids, image_features))
        elif n == 1:
            step.ids.fill_(ids[0])
        else:
            step.ids.copy_(torch.tensor([ids]), non_blocking=True)
        step.start.fill_(length)
        step.first.fill_(int(cache.take_positions(n, provenance)[0]))
        if not self.use_graphs:
            logits = self._body(step, cache, all_logits)
        elif step.graph is not None:
            step.graph.replay()
            logits = step.logits
        else:
            logits = self._capture(step, cache, all_logits)
        for layer in cache.layers:
            layer.length += n
        return logits
    def _capture(self, step: _Step, cache: PositionedCache, all_logits: bool) -> torch.Tensor:
        """Run the step for real (warm-up on a side stream), then capture it; returns the real logits."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            logits = self._body(step, cache, all_logits)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if len(self.steps) > self.max_graphs:  # an unusual length: stay eager-static for it
            return logits
        result = logits.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step.logits = self._body(step, cache, all_logits)
        step.graph = graph
        self.graphs_captured += 1
        return result
