"""The optimized language-model step: fixed shapes over preallocated KV buffers, replayed as CUDA graphs,
for one stream or for several lanes (jobs of a sweep streaming the same video) as one batch.

The eager step (VisionLanguageModel.forward) attends over the cached tokens only, so every step has new
shapes and pays Python and kernel-launch overhead (on an H200 a 2.2B decode step costs 20-28 ms for ~1 ms
of GPU work). Here a chunk of n tokens always attends over the whole buffer with a boolean mask (slot j is
visible to chunk token i when j <= length + i), and its keys/values are written at slots
length..length+n-1. Shapes then depend on n alone: on CUDA each chunk length is captured once as a CUDA
graph and replayed; elsewhere the same computation runs directly (which is how the tests check, on CPU in
fp32, that it reproduces the eager step).

Lanes (docs/sweeps.md, "Fused sweeps"): every layer's keys and values live in one buffer [lanes, kv_heads, slots,
head_dim] (slots: the largest capacity and a scratch slot, aligned to 16); lane l's PositionedCache sees row l, its first `capacities[l]` slots, so strategies reduce it in
place as they reduce a cache of their own. A step runs all lanes as one batch, each at its own length,
positions and mask; the lanes not in the call are inactive: they write into the scratch slot after the
capacity, which no active lane ever sees, so nothing of theirs changes. A step of one lane alone (its
summary, its restart text) runs on that lane's rows only, so it costs one lane; a step of several adjacent
lanes (the summaries of lanes that reduce together) runs on their rows only. A single stream is the
one-lane case.

With `compile` (stream.compile, default on CUDA) the text model's norms and MLPs run as torch.compile'd
kernels inside the step (`CompiledBlocks`), captured into the same graphs, and the vision tower's layers run
compiled while frames are encoded.

A frame's step takes its token ids and image features and embeds them itself (token embeddings, then each
`<image>` token takes the next row of its lane's features), so on CUDA the embedding and the scatter are part
of the captured graph too.

Replies decode on the device (`decode_on_device`): a chain of up to `chain` steps feeds each step the token
the previous step chose to the lanes still speaking, picks the next token (greedy: the argmax of the logits
plus the suppression bias; sampling: prospect/models/sampling.py with each lane's seeded device generator)
and checks it against the stop ids; the host reads the chosen tokens back once per chain, not once per
token. A greedy chain is one CUDA graph; a sampling chain replays the decode step's graph and draws outside
it (the lanes' generators are not captured).

The graphs are bound to these buffers: use `caches()` / `cache()` (emptied per conversation).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import torch
from transformers.cache_utils import Cache

from prospect.cache import BufferLayer, PositionedCache, Provenance
from prospect.models.sampling import sample_tokens
from prospect.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

SLOT_ALIGN = 16  # buffer slots per lane rounded up to this: an attention mask row of 16-byte multiples lets SDPA use its fused kernel


class CompiledBlocks:
    """The pointwise-heavy blocks of the model, compiled with torch.compile (inductor fuses each norm into one
    kernel, the MLP's activation into its products' epilogues; the matrix products stay cuBLAS's), for any number
    of lanes, tokens and frames (dynamic shapes):
    - the text model's: every decoder layer's MLP and two norms, and the final norm. `active()` swaps them in
      for the duration of a static step only, so the eager path of the same process stays uncompiled; under
      CUDA graphs the compiled kernels are what the captured graphs replay. Attention (the lane writer, the
      query hooks) stays as it is.
    - the vision tower's: every encoder layer whole (norms, attention, MLP, residuals) and the last norm;
      `encoding()` swaps them in while the optimized path encodes frames (prospect.stream.feed.frame_features).
    One per model (`compiled_blocks`): compiled once per process, on first use."""

    def __init__(self, model: VisionLanguageModel):
        text = model.model.model.text_model
        blocks = [block for layer in text.layers for block in (layer.input_layernorm, layer.mlp, layer.post_attention_layernorm)]
        self.blocks = [(block, torch.compile(block.forward, dynamic=True)) for block in blocks + [text.norm]]
        vision = model.model.model.vision_model
        self.vision = [(block, torch.compile(block.forward, dynamic=True)) for block in [*vision.encoder.layers, vision.post_layernorm]]

    @staticmethod
    @contextlib.contextmanager
    def _swapped(blocks) -> Iterator[None]:
        try:
            for block, compiled in blocks:
                block.forward = compiled
            yield
        finally:
            for block, _ in blocks:
                vars(block).pop("forward", None)  # the class's forward again

    def active(self) -> contextlib.AbstractContextManager:
        """The text model's compiled blocks, for a static step."""
        return self._swapped(self.blocks)

    def encoding(self) -> contextlib.AbstractContextManager:
        """The vision tower's compiled blocks, for encoding frames."""
        return self._swapped(self.vision)


def compiled_blocks(model: VisionLanguageModel) -> CompiledBlocks:
    """The model's CompiledBlocks (made once per model, kept on it)."""
    blocks = getattr(model, "_compiled_blocks", None)
    if blocks is None:
        blocks = model._compiled_blocks = CompiledBlocks(model)
    return blocks


MAX_SPANS = 8  # multi-lane row spans with graphs of their own; others run over all rows (threshold speakers vary)


def buffer_slots(capacity: int) -> int:
    """Slots a lane of `capacity` tokens attends over: its capacity, the scratch slot, rounded up to SLOT_ALIGN
    (the slots past the capacity are never visible)."""
    return -(-(capacity + 1) // SLOT_ALIGN) * SLOT_ALIGN


class _LaneWriter(Cache):
    """The cache the model sees inside a static step over lanes `rows` (a slice of the lanes) and the first
    `width` slots: lane l's keys/values (and queries, when recorded) go to its `slots[l]`; attention reads
    those buffer rows whole."""

    def __init__(self, forward: "StaticForward", slots: torch.Tensor, rows: slice, width: int):
        super().__init__(layers=list(forward._caches[0].layers))
        self.forward, self.slots, self.rows, self.width = forward, slots, rows, width
        self.lane_index = torch.arange(slots.shape[0], device=slots.device)[:, None]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys = self.forward.keys[layer_idx][self.rows, :, : self.width]
        values = self.forward.values[layer_idx][self.rows, :, : self.width]
        keys[self.lane_index, :, self.slots] = key_states.transpose(1, 2)  # [lanes, n, heads, dim] at (lane, slot)
        values[self.lane_index, :, self.slots] = value_states.transpose(1, 2)
        return keys, values

    def write_queries(self, layer_index: int, queries: torch.Tensor) -> None:
        if self.forward.queries:
            buffer = self.forward.queries[layer_index][self.rows]
            buffer[self.lane_index, self.slots] = queries.to(buffer.dtype)


class _Step:
    """Static inputs/outputs of one chunk shape (length, number of image tokens, all logits or the last), and its
    CUDA graph once captured. Positions, write slots, the mask and the input embeddings (token embeddings with
    each lane's image features scattered at its `<image>` tokens) are computed inside the step from small
    per-lane tensors (ids, cache length, first position, active) and the image features, so a replay needs
    only a few copies."""

    def __init__(self, n: int, lanes: int, image_tokens: int, hidden: int, device: torch.device, dtype: torch.dtype):
        self.n = n
        self.with_image = image_tokens > 0
        self.ids = torch.zeros(lanes, n, dtype=torch.long, device=device)
        self.features = torch.zeros(lanes, image_tokens, hidden, device=device, dtype=dtype) if image_tokens else None
        self.start = torch.zeros(lanes, dtype=torch.long, device=device)  # cache length = first write slot
        self.first = torch.zeros(lanes, dtype=torch.long, device=device)  # position of the first token
        self.active = torch.zeros(lanes, dtype=torch.bool, device=device)
        self.offsets = torch.arange(n, device=device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None


class _DecodeState:
    """The device-side state of a decode over all lanes (`StaticForward.decode_on_device`): `step` holds the
    token each lane feeds next, its cache length and position and whether it still speaks (`step.active`);
    `count` the tokens each lane chose so far; `chains` the CUDA graph of each chain length and its output
    [lanes, length] (the token a lane appended at each step, -1 where it appended none)."""

    def __init__(self, lanes: int, vocab: int, hidden: int, device: torch.device, dtype: torch.dtype, stop_ids: Sequence[int]):
        self.step = _Step(1, lanes, 0, hidden, device, dtype)
        self.count = torch.zeros(lanes, dtype=torch.long, device=device)
        self.stopped = torch.zeros(lanes, dtype=torch.bool, device=device)
        self.min_new = torch.zeros(lanes, dtype=torch.long, device=device)
        self.max_new = torch.zeros(lanes, dtype=torch.long, device=device)
        self.bias_early = torch.zeros(lanes, vocab, device=device)
        self.bias_late = torch.zeros(lanes, vocab, device=device)
        self.logits = torch.zeros(lanes, vocab, device=device)  # the prompt logits; on CPU each step's
        self.stop_ids = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        # sampling: (temperature, top_p, {lane: generator}) of the decode running, else None (greedy)
        self.sampling: tuple[float, float, dict[int, torch.Generator]] | None = None
        self.uniform = torch.full((lanes, vocab), 0.5, device=device)  # each step's noise (lanes not drawing: 0.5)
        self.forwards: dict[tuple[int, int] | None, tuple[torch.Tensor, torch.cuda.CUDAGraph]] = {}  # rows -> step graph
        self.chains: dict[tuple[int, tuple[int, int] | None], tuple[torch.Tensor, torch.cuda.CUDAGraph]] = {}  # (length, rows)


class StaticForward:
    """Drop-in for VisionLanguageModel.forward on its own caches: same arguments, same results (up to float
    rounding); `forward_lanes` runs several lanes' chunks as one batch. On CUDA the returned logits are the
    graph's output buffer: valid until the next call."""

    def __init__(
        self, model: VisionLanguageModel, capacity: int | Sequence[int], use_graphs: bool | None = None, max_graphs: int = 48,
        record_queries: bool = False, batch_lanes: bool | None = None, chain: int = 8, compile: bool = False,
    ):
        self.model = model
        self.capacities = [int(capacity)] if isinstance(capacity, int) else [int(c) for c in capacity]
        self.lanes = len(self.capacities)
        self.capacity = max(self.capacities)
        self.record_queries = record_queries
        self.device = model.device
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        # lanes as one batch (default with graphs); otherwise one lane after the other, bitwise as run alone
        self.batch_lanes = self.use_graphs if batch_lanes is None else batch_lanes
        if self.use_graphs and not self.batch_lanes:
            raise ValueError("CUDA graphs replay all lanes as one batch: batch_lanes must be true with use_graphs")
        self.max_graphs = max_graphs + 16 * (self.lanes - 1)  # and steps of some lanes' own rows (_span)
        if chain < 1:
            raise ValueError(f"chain must be at least 1 decode step, got {chain}")
        self.steps: dict[tuple[int, bool, int, tuple[int, int] | None], _Step] = {}  # (n, all logits, image tokens, rows)
        self.slots = buffer_slots(self.capacity)
        self.slot_index = torch.arange(self.slots, device=self.device)
        self.lane_index = torch.arange(self.lanes, device=self.device)[:, None]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.queries: list[torch.Tensor] = []
        self._caches: list[PositionedCache] = []
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.graphs_captured = 0
        self._spans: set[tuple[int, int]] = set()  # the multi-lane row spans given graphs of their own (_span)
        self.chain = chain
        self._decode: _DecodeState | None = None
        self.compiled = compiled_blocks(model) if compile else None  # stream.compile

    def _allocate(self) -> None:
        text = self.model.model.config.text_config
        shape = (self.lanes, text.num_key_value_heads, self.slots, text.head_dim)
        dtype, device = self.model.dtype, self.device
        width = text.num_attention_heads * text.head_dim if self.record_queries else None
        for _ in range(text.num_hidden_layers):
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=device))
            if width:
                self.queries.append(torch.zeros(self.lanes, self.slots, width, dtype=dtype, device=device))
        if width:
            self.model.new_cache(1, record_queries=True)  # installs the query hooks
        for lane, capacity in enumerate(self.capacities):
            cache = self.model.new_cache(capacity)
            cache.query_width = width
            for layer_index in range(text.num_hidden_layers):  # layers whose buffers are views of the shared ones
                layer = BufferLayer(capacity, width)
                layer.key_buffer = self.keys[layer_index][lane : lane + 1, :, :capacity]
                layer.value_buffer = self.values[layer_index][lane : lane + 1, :, :capacity]
                layer.query_buffer = self.queries[layer_index][lane, :capacity] if width else None
                layer.dtype, layer.device, layer.is_initialized = dtype, device, True
                cache.layers.append(layer)
            self._caches.append(cache)

    def caches(self) -> list[PositionedCache]:
        """One cache per lane, bound to the graphs, emptied (call once per conversation)."""
        if not self._caches:
            self._allocate()
        for cache in self._caches:
            cache.reset()
        return list(self._caches)

    def cache(self) -> PositionedCache:
        """The first lane's cache, emptied (a single stream's cache)."""
        return self.caches()[0]

    def _body(self, step: _Step, all_logits: bool, rows: slice | None = None, width: int | None = None) -> torch.Tensor:
        """The step for the lanes `rows` (default all) over their first `width` slots (default all). Without CUDA
        graphs (whose shapes are fixed) it attends only over the slots in use (`_used_width`)."""
        rows = rows or slice(None)
        width = width or self.slots
        if not self.use_graphs:
            width = self._used_width(step, rows, width)
        ids = step.ids[rows]
        embeds = self.model.model.get_input_embeddings()(ids)
        if step.with_image:  # the k-th <image> token of a lane takes row k of its features (VisionLanguageModel.embed)
            is_image = (ids == self.model.image_token_id)[..., None]
            index = (is_image.long().cumsum(1) - 1).clamp(min=0).expand(-1, -1, embeds.shape[-1])
            embeds = torch.where(is_image, step.features[rows].gather(1, index), embeds)
        start, first, active = step.start[rows], step.first[rows], step.active[rows]
        # inactive lanes write into the last slot of the rows run: past every capacity there, never visible
        slots = torch.where(active[:, None], start[:, None] + step.offsets[None], width - 1)  # [lanes, n]
        positions = first[:, None] + step.offsets[None]
        mask = (self.slot_index[None, None, :width] <= slots[:, :, None])[:, None]  # [lanes, 1, n, width]
        writer = _LaneWriter(self, slots, rows, width)
        self.model.writing_cache = writer  # query recording (if on) writes through it, inside the graph
        try:
            with self.compiled.active() if self.compiled is not None else contextlib.nullcontext():
                hidden = self.model.model.model.text_model(
                    inputs_embeds=embeds, position_ids=positions, attention_mask=mask, past_key_values=writer, use_cache=True,
                ).last_hidden_state
        finally:
            self.model.writing_cache = None
        return self.model.model.lm_head(hidden if all_logits else hidden[:, -1]).float()

    def _used_width(self, step: _Step, rows: slice, width: int) -> int:
        """The slots a step without graphs attends over: past every token the lanes `rows` hold, have written in
        this decode (`step.start`, which a decode chain advances before the caches' lengths) or this step writes,
        and one more (the scratch slot of the inactive lanes), rounded up to SLOT_ALIGN, at most `width`. The
        slots left out are masked for every token of the step, so the logits are those over `width` slots up to
        floating-point rounding (a stream's optimized run computes with this rule, alone or as a lane)."""
        lanes = range(self.lanes)[rows]
        longest = max(max(self._caches[lane].get_seq_length() for lane in lanes), int(step.start[rows].max()) + step.n)
        return min(width, -(-(longest + 1) // SLOT_ALIGN) * SLOT_ALIGN)

    def _one_lane_at_a_time(self, step: _Step, all_logits: bool, lanes: list[int]) -> torch.Tensor:
        """The step lane by lane, each over its own buffer_slots(capacity): the arithmetic of a stream run alone,
        bitwise (on CPU, a matrix product's rounding depends on how many rows it has)."""
        out = [self._body(step, all_logits, slice(lane, lane + 1), buffer_slots(self.capacities[lane])) for lane in lanes]
        return torch.cat(out)

    def __call__(
        self,
        input_ids: Sequence[int],
        cache: PositionedCache,
        image_features: torch.Tensor | None = None,
        all_logits: bool = False,
        provenance: Provenance | None = None,
        append: bool = True,
    ) -> torch.Tensor:
        """One lane's chunk (the others inactive): logits [vocab], or [n, vocab] with all_logits."""
        return self.forward_lanes([cache], [input_ids], image_features, all_logits, [provenance], append)[0]

    @torch.no_grad()
    def forward_lanes(
        self,
        caches: Sequence[PositionedCache],
        input_ids: Sequence[Sequence[int]],
        image_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        all_logits: bool = False,
        provenances: Sequence[Provenance | None] | None = None,
        append: bool = True,
    ) -> torch.Tensor:
        """Append each lane's chunk (`input_ids[i]` to `caches[i]`, all of one length) as one batch; returns
        the logits of those lanes, in order: [len(caches), vocab] (or [len(caches), n, vocab]). Image tokens
        take the rows of `image_features`: one tensor for a frame every lane feeds alike (the same ids), or a
        list with each lane's own (lanes streaming different conversations).

        append=False computes the chunk on top of each cache without keeping it: its keys/values go to the
        free slots after the cache's tokens (never visible: a later chunk overwrites them before anything
        attends there) and lengths, positions and provenance stay as they were."""
        ids = [list(chunk) for chunk in input_ids]
        n = len(ids[0]) if ids else 0
        provenances = list(provenances) if provenances is not None else [None] * len(caches)
        lanes = []
        for cache, chunk in zip(caches, ids):
            lane = self._lane_of(cache)
            if len(chunk) != n:
                raise ValueError(f"lanes of one step feed chunks of one length ({len(chunk)} != {n})")
            if cache.get_seq_length() + n > self.capacities[lane]:
                raise RuntimeError(f"KV buffer full: {cache.get_seq_length()} + {n} tokens > capacity {self.capacities[lane]}")
            lanes.append(lane)
        if len(set(lanes)) != len(lanes):
            raise ValueError("a lane appears twice in one step")
        per_lane_images = isinstance(image_features, (list, tuple))
        if per_lane_images and len(image_features) != len(ids):
            raise ValueError(f"{len(image_features)} lanes' image features for {len(ids)} chunks")
        if image_features is not None and not per_lane_images and any(chunk != ids[0] for chunk in ids):
            raise ValueError("a step with one image feeds the same ids to every lane (pass one image per lane otherwise)")
        # the image features are checked first: a chunk whose features do not fit raises before any cache changes
        features = self._image_rows(ids, image_features if per_lane_images else [image_features] * len(ids))
        image_tokens = max((len(rows) for rows in features if rows is not None), default=0)
        span = self._span(lanes)
        key = (n, all_logits, image_tokens, span)
        step = self.steps.get(key)
        if step is None:
            hidden = self.model.model.config.text_config.hidden_size
            step = self.steps[key] = _Step(n, self.lanes, image_tokens, hidden, self.device, self.model.dtype)
        if image_tokens and not per_lane_images:  # one frame for all lanes: one copy
            step.features.copy_(features[0].expand(self.lanes, -1, -1))
        elif image_tokens:  # the other lanes' rows keep stale features: inactive, they write nowhere seen
            for lane, rows in zip(lanes, features):
                if rows is not None:
                    step.features[lane, : len(rows)].copy_(rows)
        start, first, active = [0] * self.lanes, [0] * self.lanes, [False] * self.lanes
        rows = [[0] * n for _ in range(self.lanes)]
        for lane, cache, chunk, provenance in zip(lanes, caches, ids, provenances):
            start[lane] = cache.get_seq_length()
            first[lane] = int(cache.take_positions(n, provenance)[0]) if append else cache.next_position
            active[lane] = True
            rows[lane] = chunk
        step.ids.copy_(torch.tensor(rows), non_blocking=True)
        step.start.copy_(torch.tensor(start), non_blocking=True)
        step.first.copy_(torch.tensor(first), non_blocking=True)
        step.active.copy_(torch.tensor(active), non_blocking=True)
        if not self.batch_lanes:
            logits = self._one_lane_at_a_time(step, all_logits, lanes)
        else:
            rows, width = self._rows(span)
            if not self.use_graphs:
                logits = self._body(step, all_logits, rows, width)
            elif step.graph is not None:
                step.graph.replay()
                logits = step.logits
            else:
                logits = self._capture(step, all_logits, rows, width)
            first_row = span[0] if span is not None else 0
            if [lane - first_row for lane in lanes] != list(range(len(logits))):
                logits = logits[[lane - first_row for lane in lanes]]
        if not append:
            return logits
        for cache in caches:
            for layer in cache.layers:
                layer.length += n
        return logits

    def _image_rows(self, ids: list[list[int]], image_features: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Each chunk's image feature rows [its <image> tokens, hidden] (None for a chunk without image tokens);
        raises where a chunk's <image> tokens and its features' rows differ in number (counted on the host: no
        device sync)."""
        hidden = self.model.model.config.text_config.hidden_size
        out = []
        for chunk, image in zip(ids, image_features):
            count = sum(1 for token in chunk if token == self.model.image_token_id)
            rows = image.reshape(-1, hidden) if image is not None else None
            if (rows.shape[0] if rows is not None else 0) != count:
                raise ValueError(f"{count} <image> tokens but {0 if rows is None else rows.shape[0]} image feature rows")
            out.append(rows if count else None)
        return out

    # ---- greedy decode on the device ----------------------------------------------------------------

    def _lane_of(self, cache: PositionedCache) -> int:
        lane = next((i for i, own in enumerate(self._caches) if own is cache), None)
        if lane is None:
            raise ValueError("StaticForward runs on the caches from its caches() method only")
        return lane

    @torch.no_grad()
    def decode_on_device(
        self,
        caches: Sequence[PositionedCache],
        logits: Sequence[torch.Tensor],
        biases: Sequence[tuple[torch.Tensor, torch.Tensor]],
        min_new_tokens: int,
        max_new_tokens: int | Sequence[int],
        kind: int,
        sampling: tuple[float, float, Sequence[torch.Generator]] | None = None,
    ) -> list[tuple[list[int], bool]]:
        """Replies of the lanes of `caches` from their prompt logits (`logits[i]`, [vocab]), chosen as
        prospect.stream.decode's host loop chooses them: step s takes the logits plus `biases[i][0]` while
        s < min_new_tokens, else plus `biases[i][1]`, and picks their argmax (greedy) or, with `sampling` =
        (temperature, top_p, one generator on this device per lane), sample_tokens with noise
        torch.rand(vocab, generator) drawn at every step; a stop id ends the reply (and is not
        part of it); a reply ends at max_new_tokens tokens. Each chosen token but a reply's last one
        (which the caller feeds with the turn's closing) is fed to its lane, labelled `kind`; a reply ended by
        a stop id has all its tokens fed; `max_new_tokens` is one bound for all or one per lane. Returns per
        lane (reply tokens, whether a stop id ended it).

        The steps run on the device in chains of up to `self.chain` (a CUDA graph each with graphs); the host
        reads the chosen tokens back once per chain. The first chain runs before the host has looked at the
        first tokens, so when every lane stops at its first token it runs with all lanes inactive (writing
        only scratch slots). A chain keeps the batch it started with (all lanes, or one lane's own rows) while
        lanes stop; the host loop, down to one lane, switches to that lane's rows, so with batched lanes on a
        GPU the two may round differently in bf16 (on CPU they are equal, tests/test_lanes.py)."""
        lanes = [self._lane_of(cache) for cache in caches]
        if len(set(lanes)) != len(lanes):
            raise ValueError("a lane appears twice in one decode")
        limits = [int(max_new_tokens)] * len(lanes) if isinstance(max_new_tokens, int) else [int(n) for n in max_new_tokens]
        if len(limits) != len(lanes):
            raise ValueError(f"{len(limits)} max_new_tokens for {len(lanes)} lanes")
        longest = max(limits, default=0)
        if longest < 1:
            return [([], False) for _ in lanes]
        for lane, cache, limit in zip(lanes, caches, limits):
            if cache.get_seq_length() + limit - 1 > self.capacities[lane]:
                raise RuntimeError(f"KV buffer full: {cache.get_seq_length()} + {limit - 1} reply tokens > capacity "
                                   f"{self.capacities[lane]}")
        state = self._decode_state()
        step = state.step
        start, first, speaking = [0] * self.lanes, [0] * self.lanes, [False] * self.lanes
        for lane, cache, limit in zip(lanes, caches, limits):
            start[lane], first[lane], speaking[lane] = cache.get_seq_length(), cache.next_position, limit >= 1
        step.start.copy_(torch.tensor(start), non_blocking=True)
        step.first.copy_(torch.tensor(first), non_blocking=True)
        step.active.copy_(torch.tensor(speaking), non_blocking=True)
        state.count.zero_()
        state.stopped.zero_()
        state.min_new.fill_(min_new_tokens)
        index = torch.tensor(lanes, device=self.device)
        state.max_new[index] = torch.tensor(limits, device=self.device)
        state.bias_early[index] = torch.stack([early for early, _ in biases]).float()
        state.bias_late[index] = torch.stack([late for _, late in biases]).float()
        state.logits[index] = torch.stack(list(logits)).float()
        state.sampling = None
        if sampling is not None:
            temperature, top_p, generators = sampling
            state.sampling = (float(temperature), float(top_p), dict(zip(lanes, generators)))
        chosen = [self._pick(state, state.logits)[:, None]]
        span = self._span(lanes)
        done, read = 1, []
        while True:
            if done < longest:
                length = min(self.chain, longest - done)
                chosen.append(self._run_chain(state, length, span))
                done += length
            record = torch.cat([*chosen, step.active[:, None].long(), state.stopped[:, None].long()], 1).cpu()  # one sync
            read.append(record[:, :-2])
            chosen = []
            if done >= longest or not bool(record[:, -2].any()):
                break
        tokens = torch.cat(read, 1)
        replies = []
        for lane, cache in zip(lanes, caches):
            reply = [token for token in tokens[lane].tolist() if token >= 0]
            stopped = bool(record[lane, -1])
            fed = len(reply) if stopped else max(len(reply) - 1, 0)
            if fed:
                cache.take_positions(fed, Provenance.of(fed, kind))
                for layer in cache.layers:
                    layer.length += fed
            replies.append((reply, stopped))
        return replies

    def _decode_state(self) -> _DecodeState:
        if self._decode is None:
            hidden = self.model.model.config.text_config.hidden_size
            vocab = self.model.model.lm_head.out_features
            self._decode = _DecodeState(self.lanes, vocab, hidden, self.device, self.model.dtype, self.model.stop_ids)
        return self._decode

    def _pick(self, state: _DecodeState, logits: torch.Tensor) -> torch.Tensor:
        """Each speaking lane's next token from its logits [lanes, vocab] (no host sync): returns the tokens the
        lanes append (-1 for a lane not speaking or stopping), updates who still speaks and feeds next."""
        speaking = state.step.active.clone()
        early = (state.count < state.min_new)[:, None]
        biased = logits + torch.where(early, state.bias_early, state.bias_late)
        if state.sampling is None:
            token = torch.argmax(biased, dim=-1)
        else:
            temperature, top_p, generators = state.sampling
            for lane, generator in generators.items():
                state.uniform[lane] = torch.rand(state.uniform.shape[1], generator=generator, device=self.device)
            token = sample_tokens(biased, temperature, top_p, state.uniform)
        stop = torch.isin(token, state.stop_ids)
        state.stopped |= speaking & stop
        state.count += speaking.long()
        keep = speaking & ~stop
        state.step.active.copy_(keep & (state.count < state.max_new))  # a reply's last token is not fed here
        state.step.ids[:, 0].copy_(token)
        return torch.where(keep, token, -1)

    def _chain_body(self, state: _DecodeState, length: int, span: tuple[int, int] | None, graphed_step: bool = False) -> torch.Tensor:
        """`length` steps: feed each speaking lane its token, pick its next; returns [lanes, length] appended tokens.
        `span`: the rows [start, stop) of the lanes decoding, run on those rows only (the other rows of the logits
        are not read). `graphed_step`: each step's forward replays its CUDA graph (a sampling chain, not itself
        captured)."""
        step = state.step
        out = []
        for _ in range(length):
            if self.batch_lanes and span is not None:
                logits = state.logits
                logits[span[0] : span[1]] = self._step_graph(state, span) if graphed_step else self._body(step, False, *self._rows(span))
            elif self.batch_lanes:
                logits = self._step_graph(state, None) if graphed_step else self._body(step, False)
            else:  # lane by lane, as each lane alone (see _one_lane_at_a_time)
                logits = state.logits
                active = step.active.nonzero().flatten().tolist()
                if active:
                    logits[active] = self._one_lane_at_a_time(step, False, active)
            moved = step.active.long()
            step.start += moved
            step.first += moved
            out.append(self._pick(state, logits))
        return torch.stack(out, 1)

    def _run_chain(self, state: _DecodeState, length: int, span: tuple[int, int] | None) -> torch.Tensor:
        """The chain of `length` steps: replayed as a CUDA graph once captured (the warm-up is the first real run;
        capturing records without running)."""
        if not self.use_graphs:
            return self._chain_body(state, length, span)
        if state.sampling is not None:  # the draws stay outside graphs; each step's forward is replayed
            return self._chain_body(state, length, span, graphed_step=True)
        if (length, span) in state.chains:
            out, graph = state.chains[length, span]
            graph.replay()
            return out
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            result = self._chain_body(state, length, span)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._chain_body(state, length, span)
        state.chains[length, span] = (out, graph)
        self.graphs_captured += 1
        return result

    def _step_graph(self, state: _DecodeState, span: tuple[int, int] | None) -> torch.Tensor:
        """The decode step's logits for the rows of `span` (all rows: None), from its CUDA graph (captured on
        first use, after a real run on a side stream, whose logits it returns)."""
        if span in state.forwards:
            out, graph = state.forwards[span]
            graph.replay()
            return out
        rows, width = self._rows(span)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            result = self._body(state.step, False, rows, width)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._body(state.step, False, rows, width)
        state.forwards[span] = (out, graph)
        self.graphs_captured += 1
        return result

    def _span(self, lanes: list[int]) -> tuple[int, int] | None:
        """The rows [start, stop) a batched step of the lanes `lanes` runs on when they are some adjacent lanes
        (one lane's summary or restart text; the summaries of lanes reducing together, adjacent in a sweep's
        order): the step then costs those lanes, not all of them. None: all rows (a step of all lanes, of lanes
        that are not adjacent, or a one-lane forward). At most MAX_SPANS spans of several lanes get rows (and
        graphs) of their own; past that, such steps run over all rows."""
        if not self.batch_lanes or self.lanes == 1 or len(lanes) == self.lanes:
            return None
        start, stop = min(lanes), max(lanes) + 1
        if stop - start != len(lanes):
            return None
        span = (start, stop)
        if len(lanes) > 1 and span not in self._spans:  # each span has its own graphs: few multi-lane spans
            if len(self._spans) >= MAX_SPANS:
                return None
            self._spans.add(span)
        return span

    def _rows(self, span: tuple[int, int] | None) -> tuple[slice | None, int | None]:
        """(buffer rows, slots) a batched step runs over: those of the lanes of `span` (slots enough for the
        largest capacity among them, and a scratch slot past it), or all (None, None)."""
        if span is None:
            return None, None
        return slice(*span), buffer_slots(max(self.capacities[span[0] : span[1]]))

    def _capture(self, step: _Step, all_logits: bool, rows: slice | None = None, width: int | None = None) -> torch.Tensor:
        """Run the step for real (warm-up on a side stream), then capture it; returns the real logits."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            logits = self._body(step, all_logits, rows, width)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if len(self.steps) > self.max_graphs:  # an unusual length: stay eager-static for it
            return logits
        result = logits.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step.logits = self._body(step, all_logits, rows, width)
        step.graph = graph
        self.graphs_captured += 1
        return result
