"""Operations on a transformers KV cache: length, keep spans, crop, re-rotate keys.

transformers stores keys *after* RoPE, so a cache alone does not say at which positions its tokens
were encoded. `PositionedCache` is a transformers `Cache` whose layers are preallocated buffers of
`capacity` tokens (appending writes in place; no per-step concatenation), and which records the
position of every cached token (`positions`, absolute token positions) and the position the next
token gets (`next_position`). Eviction moves kept tokens to the front of the buffers; slices and
copies are exact (bitwise), `rerotate` applies a RoPE rotation by (new - old) positions.

Token provenance: the cache also records, for every cached token, its kind (`TOKEN_KINDS`: system, user,
knowledge, frame_text, image, assistant, summary; -1 when the writer did not say), the stream index of the
frame it belongs to (frame_text and image tokens; -1 for dialogue tokens), for image tokens their patch
index within the frame (-1 otherwise), and how many original tokens it stands for (`merged`: 1, more for a
token a merging strategy made). These host-side records (`Records`) move with the tokens through every
operation here, so strategies can ask what each slot holds.

Per-(layer, head) selection: a reduction may keep different tokens in each layer and KV head
(`keep_tokens_per_head`; SnapKV and KnormPress select so). Every layer and head still keeps the same number
of tokens (the buffers stay rectangular, one cache length), but slot i then holds a different token per
(layer, head): the records become [layers, kv_heads, length] (`cache.per_head`; `head_records()` gives
that shape in either case). On such a cache the one-per-slot views (`positions`, `kinds`, `frames`,
`patches`, `merged`, `provenance`, `frame_mask`) raise `PerHeadCacheError` rather than answer for one head.

Optionally (`record_queries`), each layer also keeps the pre-RoPE query vector of every cached token in a
buffer parallel to the keys (written by the model's forward, moved by the same operations): SnapKV-style
scores read the queries of the last tokens without another forward pass.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer


TOKEN_KINDS = ("system", "user", "knowledge", "frame_text", "image", "assistant", "summary")
KIND = {name: code for code, name in enumerate(TOKEN_KINDS)}
UNKNOWN_KIND = -1  # a token written without provenance (counted as dialogue)
FRAME_KINDS = (KIND["frame_text"], KIND["image"])


class Provenance(NamedTuple):
    """Per-token labels of a chunk: kind codes (KIND), frame stream index (-1: none), patch index (-1: none)."""

    kinds: torch.Tensor  # int8 [n]
    frames: torch.Tensor  # long [n]
    patches: torch.Tensor  # long [n]

    @staticmethod
    def of(count: int, kind: int = UNKNOWN_KIND, frame: int = -1) -> "Provenance":
        """`count` tokens of one kind (and one frame)."""
        return Provenance(
            torch.full((count,), kind, dtype=torch.int8), torch.full((count,), frame, dtype=torch.long),
            torch.full((count,), -1, dtype=torch.long),
        )

    @staticmethod
    def concat(parts: Sequence["Provenance"]) -> "Provenance":
        if not parts:
            return Provenance.of(0)
        return Provenance(*(torch.cat([getattr(p, name) for p in parts]) for name in Provenance._fields))


class PerHeadCacheError(RuntimeError):
    """A one-per-slot view of a cache whose layers and heads hold different tokens."""


class Records(NamedTuple):
    """What the cache knows of its tokens, one entry per cached token: each tensor is [n] while every layer
    and head holds the same token in a slot, [layers, kv_heads, n] after a per-(layer, head) selection."""

    positions: torch.Tensor  # long: RoPE position the token's key carries
    kinds: torch.Tensor  # int8: KIND code
    frames: torch.Tensor  # long: stream frame index (-1: none)
    patches: torch.Tensor  # long: patch index of an image token (-1: none)
    merged: torch.Tensor  # long: original tokens this one stands for (1 unless merged)

    @staticmethod
    def of(positions: torch.Tensor, provenance: Provenance) -> "Records":
        return Records(positions.to(torch.long), provenance.kinds.to(torch.int8), provenance.frames.to(torch.long),
                       provenance.patches.to(torch.long), torch.ones(len(positions), dtype=torch.long))

    @property
    def per_head(self) -> bool:
        return self.positions.dim() == 3

    def select(self, index: torch.Tensor) -> "Records":
        """The records of slots `index` (the same slots in every layer and head)."""
        return Records(*(t[..., index] for t in self))

    def gather(self, index: torch.Tensor) -> "Records":
        """The records of slots index[layer, head] ([layers, kv_heads, n'])."""
        layers, heads = index.shape[:2]
        return Records(*(torch.gather(t.expand(layers, heads, -1) if t.dim() == 1 else t, -1, index) for t in self))

    def append(self, new: "Records") -> "Records":
        """These records followed by `new` ([m] each: new tokens are the same in every layer and head)."""
        if self.per_head:
            layers, heads = self.positions.shape[:2]
            new = Records(*(t.expand(layers, heads, -1) for t in new))
        return Records(*(torch.cat([old, extra.to(old.dtype)], dim=-1) for old, extra in zip(self, new)))

    def expanded(self, layers: int, heads: int) -> "Records":
        """[layers, heads, n] records (a view where every layer and head holds the same tokens)."""
        return self if self.per_head else Records(*(t.expand(layers, heads, -1) for t in self))


def _slot_record(name: str) -> property:
    """A one-per-slot view of record `name`: [n], or PerHeadCacheError on a per-(layer, head) cache."""

    def read(cache: "PositionedCache") -> torch.Tensor:
        if cache.per_head:
            raise PerHeadCacheError(
                f"cache.{name}: this cache holds different tokens per (layer, head) after a per-head selection; "
                "read cache.head_records()"
            )
        return getattr(cache.records, name)

    def write(cache: "PositionedCache", value: torch.Tensor) -> None:
        cache.records = cache.records._replace(**{name: value})

    return property(read, write)


class BufferLayer(DynamicLayer):
    """One layer's keys/values in buffers [batch, kv_heads, capacity, head_dim]; `keys`/`values` are
    views of the first `length` tokens (made on access). Appending past `capacity` raises."""

    def __init__(self, capacity: int, query_width: int | None = None):
        self.capacity = capacity
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        self.query_width = query_width  # set: keep a [capacity, query_width] buffer of pre-RoPE queries
        self.query_buffer: torch.Tensor | None = None
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.key_buffer is None else self.key_buffer[:, :, : self.length]

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:
            raise AttributeError("BufferLayer keys are views of its buffer; write with update() or keep()")

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.value_buffer is None else self.value_buffer[:, :, : self.length]

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("BufferLayer values are views of its buffer; write with update() or keep()")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, dim = key_states.shape
        self.key_buffer = torch.zeros(batch, heads, self.capacity, dim, dtype=key_states.dtype, device=key_states.device)
        self.value_buffer = torch.zeros(
            batch, heads, self.capacity, value_states.shape[-1], dtype=value_states.dtype, device=value_states.device
        )
        if self.query_width:
            self.query_buffer = torch.zeros(self.capacity, self.query_width, dtype=key_states.dtype, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[-2]
        if self.length + count > self.capacity:
            raise RuntimeError(f"KV buffer full: {self.length} + {count} tokens > capacity {self.capacity}")
        self.key_buffer[:, :, self.length : self.length + count] = key_states
        self.value_buffer[:, :, self.length : self.length + count] = value_states
        self.length += count
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def keep(self, index: torch.Tensor) -> None:
        """Keep the tokens at `index` (ascending), moved to the front in order."""
        if self.is_initialized:
            count = index.numel()
            index = index.to(self.key_buffer.device)
            self.key_buffer[:, :, :count] = self.key_buffer[:, :, index]  # the gather copies before writing
            self.value_buffer[:, :, :count] = self.value_buffer[:, :, index]
            if self.query_buffer is not None:
                self.query_buffer[:count] = self.query_buffer[index]
            self.length = count

    def keep_per_head(self, index: torch.Tensor) -> None:
        """Keep, in each KV head h, the tokens at index[h] (ascending; every head the same count)."""
        if self.is_initialized:
            heads, count = index.shape
            index = index.to(self.key_buffer.device)
            batch = self.key_buffer.shape[0]
            for buffer in (self.key_buffer, self.value_buffer):
                gather = index[None, :, :, None].expand(batch, heads, count, buffer.shape[-1])
                buffer[:, :, :count] = torch.gather(buffer[:, :, : self.length], 2, gather)
            if self.query_buffer is not None:  # query heads of KV head h are h*group .. h*group+group-1
                queries = self.query_buffer[: self.length].view(self.length, heads, -1)
                gather = index.T[:, :, None].expand(count, heads, queries.shape[-1])
                self.query_buffer[:count] = torch.gather(queries, 0, gather).reshape(count, -1)
            self.length = count

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove from the end")
        self.length = max(0, self.length + tokens_to_remove)

    def reset(self) -> None:
        self.length = 0


class PositionedCache(Cache):
    """A KV cache of preallocated per-layer buffers plus the RoPE position of each cached token."""

    def __init__(
        self, capacity: int, inv_freq: torch.Tensor | None = None, attention_scaling: float = 1.0, query_width: int | None = None
    ):
        super().__init__(layer_class_to_replicate=lambda: BufferLayer(capacity, query_width))
        self.capacity = capacity
        # on CPU; see Records. Kept in two parts so that appending stays cheap on a per-head cache: the
        # per-(layer, head) records of the tokens a per-head reduction kept ([layers, kv_heads, n0], or None)
        # and the records of the tokens appended since ([n1], the same in every layer and head).
        self._head_part: Records | None = None
        self._tail: Records = Records.of(torch.empty(0, dtype=torch.long), Provenance.of(0))
        self._head_frame_tokens: torch.Tensor | None = None  # frame tokens per (layer, head) of _head_part
        self.next_position = 0
        self.inv_freq = inv_freq
        self.attention_scaling = attention_scaling
        self.query_width = query_width
        self.write_slots: torch.Tensor | None = None  # buffer slots of the chunk being written (query recording)

    def take_positions(self, count: int, provenance: Provenance | None = None) -> torch.Tensor:
        """Positions for `count` new tokens (recorded as cached, with their provenance; unknown if None):
        next_position, next_position + 1, ..."""
        provenance = provenance or Provenance.of(count)
        if len(provenance.kinds) != count:
            raise ValueError(f"provenance for {len(provenance.kinds)} tokens given for a chunk of {count}")
        new = torch.arange(self.next_position, self.next_position + count, dtype=torch.long)
        self._tail = self._tail.append(Records.of(new, provenance))
        self.next_position += count
        return new

    def write_queries(self, layer_index: int, queries: torch.Tensor) -> None:
        """Keep a forward's pre-RoPE queries ([1, n, width]) at `write_slots`, if this cache records queries."""
        buffer = self.layers[layer_index].query_buffer if self.query_width else None
        if buffer is not None:
            buffer.index_copy_(0, self.write_slots, queries[0].to(buffer.dtype))

    positions = _slot_record("positions")
    kinds = _slot_record("kinds")
    frames = _slot_record("frames")
    patches = _slot_record("patches")
    merged = _slot_record("merged")

    @property
    def records(self) -> Records:
        """What the cache knows of every cached token ([n] each, or [layers, kv_heads, n]; see Records)."""
        return self._tail if self._head_part is None else self._head_part.append(self._tail)

    @records.setter
    def records(self, value: Records) -> None:
        self._head_part = value if value.per_head else None
        self._tail = Records.of(torch.empty(0, dtype=torch.long), Provenance.of(0)) if value.per_head else value
        self._head_frame_tokens = None

    @property
    def per_head(self) -> bool:
        """True once a reduction kept different tokens per (layer, head)."""
        return self._head_part is not None

    @property
    def provenance(self) -> Provenance:
        return Provenance(self.kinds, self.frames, self.patches)

    def head_records(self) -> Records:
        """The records as [layers, kv_heads, length] tensors (a broadcast view while every head agrees)."""
        buffers = [layer.key_buffer for layer in self.layers if layer.is_initialized]
        if not buffers:
            raise ValueError("head_records: the cache holds no layer yet")
        return self.records.expanded(len(buffers), buffers[0].shape[1])

    def select_tokens(self, index: torch.Tensor) -> None:
        """Keep the host-side records of the tokens at `index` (the same slots in every layer and head)."""
        kept = self._head_part.positions.shape[-1] if self._head_part is not None else 0
        count = index.numel()
        if kept <= count and torch.equal(index, torch.arange(count)):  # a crop of appended tokens (crop_end)
            self._tail = self._tail.select(torch.arange(count - kept))
        else:
            self.records = self.records.select(index)

    def reset(self) -> None:
        """Empty the cache (buffers stay allocated) and restart positions at 0."""
        for layer in self.layers:
            layer.reset()
        self.records = Records.of(torch.empty(0, dtype=torch.long), Provenance.of(0))
        self.next_position = 0

    def frame_mask(self) -> torch.Tensor:
        """True for each cached token of a frame (image or frame_text)."""
        return (self.kinds == FRAME_KINDS[0]) | (self.kinds == FRAME_KINDS[1])

    def frame_tokens(self) -> int:
        """Cached tokens of frames (image + frame_text); see frame_tokens_per_head on a per-head cache."""
        return int(self.frame_mask().sum())

    def frame_tokens_per_head(self) -> torch.Tensor:
        """Cached frame tokens (image + frame_text) of each (layer, KV head): long [layers, kv_heads]."""
        def count(kinds: torch.Tensor) -> torch.Tensor:
            return ((kinds == FRAME_KINDS[0]) | (kinds == FRAME_KINDS[1])).sum(dim=-1)

        if self._head_part is None:
            return count(self.head_records().kinds)
        if self._head_frame_tokens is None:  # once per reduction, not per frame
            self._head_frame_tokens = count(self._head_part.kinds)
        return self._head_frame_tokens + count(self._tail.kinds)

    def layer_tensors(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) of each layer: views [batch, kv_heads, length, head_dim]."""
        for layer in self.layers:
            if layer.is_initialized:
                yield layer.keys, layer.values

    def check(self) -> None:
        """Raise if the recorded positions do not match the cached tokens."""
        for name, record in zip(Records._fields, self.records):
            if record.shape[-1] != self.get_seq_length():
                raise RuntimeError(f"cache holds {self.get_seq_length()} tokens but records {record.shape[-1]} {name}")


def cache_length(cache: Cache) -> int:
    return cache.get_seq_length()


def keep_spans(cache: PositionedCache, spans: list[tuple[int, int]]) -> None:
    """Keep tokens [start, end) of each span, in order, in every layer (in place). [] empties the cache."""
    length = cache_length(cache)
    spans = [(max(0, a), min(length, b)) for a, b in spans if min(length, b) > max(0, a)]
    index = torch.cat([torch.arange(a, b) for a, b in spans]) if spans else torch.empty(0, dtype=torch.long)
    keep_tokens(cache, index)


def keep_tokens(cache: PositionedCache, index: torch.Tensor) -> None:
    """Keep the tokens at `index` (ascending cache slots), in order, in every layer (in place)."""
    length = cache_length(cache)
    index = index.to(torch.long).cpu()
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise ValueError("keep_tokens: the index must be strictly ascending")
    if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= length):
        raise ValueError(f"keep_tokens: index out of range for a cache of {length} tokens")
    if index.numel() == length:
        return  # keeps everything
    for layer in cache.layers:
        layer.keep(index)
    cache.select_tokens(index)


def keep_tokens_per_head(cache: PositionedCache, index: torch.Tensor) -> None:
    """Keep, in layer l and KV head h, the tokens at index[l, h] (strictly ascending slots; the same count in
    every layer and head, so the buffers stay rectangular), in order (in place). The records become per
    (layer, head) (see the module docstring)."""
    length = cache_length(cache)
    layers = [layer for layer in cache.layers if layer.is_initialized]
    index = index.to(torch.long).cpu()
    if index.dim() != 3 or layers and tuple(index.shape[:2]) != (len(layers), layers[0].key_buffer.shape[1]):
        raise ValueError(f"keep_tokens_per_head: index of shape {tuple(index.shape)}, not [layers, kv_heads, count]")
    if index.shape[-1] > 1 and not bool((index[..., 1:] > index[..., :-1]).all()):
        raise ValueError("keep_tokens_per_head: each head's index must be strictly ascending")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= length):
        raise ValueError(f"keep_tokens_per_head: index out of range for a cache of {length} tokens")
    for layer, per_layer in zip(layers, index):
        layer.keep_per_head(per_layer)
    cache.records = cache.records.gather(index)


def crop_end(cache: PositionedCache, count: int) -> None:
    """Remove the last `count` tokens and give their positions back (next_position moves back). The kept
    tokens stay where they are (no copy); the removed slots are free again."""
    if count <= 0:
        return
    length = cache_length(cache)
    if count > length:
        raise ValueError(f"crop_end: cannot remove {count} tokens from a cache of {length}")
    for layer in cache.layers:
        if layer.is_initialized:
            layer.crop(-count)
    cache.select_tokens(torch.arange(length - count))
    cache.next_position -= count


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rerotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate post-RoPE keys [b, h, n, d] by `delta` positions ([n], or [h, n]: one row per head) with
    Llama's RoPE (rotate_half)."""
    compute = torch.float64 if keys.dtype == torch.float64 else torch.float32  # bf16 keys rotate in fp32
    freqs = delta.to(keys.device, compute)[..., None] * inv_freq.to(keys.device, compute)
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    k = keys.to(compute)
    return (k * cos + rotate_half(k) * sin).to(keys.dtype)


def make_contiguous(cache: PositionedCache) -> None:
    """Re-rotate keys so the cache holds positions 0..len-1; new tokens continue at len (StreamingLLM)."""
    length = cache_length(cache)
    target = torch.arange(length, dtype=torch.long)
    delta = target - cache.records.positions  # [n], or [layers, heads, n] on a per-head cache
    if bool((delta != 0).any()):
        if cache.inv_freq is None:
            raise ValueError("contiguous positions need the model's RoPE inv_freq on the cache")
        if cache.attention_scaling != 1.0:
            raise ValueError(f"contiguous positions need plain RoPE (attention_scaling 1), got {cache.attention_scaling}")
    if cache.per_head:
        layers = [layer for layer in cache.layers if layer.is_initialized]
        for layer, layer_delta in zip(layers, delta):
            moved = layer_delta != 0
            if bool(moved.any()):  # rotate every slot of the layer, keep the unmoved ones bitwise
                keys = layer.key_buffer[:, :, :length]
                rotated = rerotate(keys, layer_delta, cache.inv_freq)
                layer.key_buffer[:, :, :length] = torch.where(moved.to(keys.device)[None, :, :, None], rotated, keys)
        cache.records = cache.records._replace(positions=target.expand_as(delta).clone())
    else:
        moved = torch.nonzero(delta != 0).flatten()
        if moved.numel():
            for layer in cache.layers:
                if layer.is_initialized:
                    index = moved.to(layer.key_buffer.device)
                    layer.key_buffer[:, :, index] = rerotate(layer.key_buffer[:, :, index], delta[moved], cache.inv_freq)
        cache.positions = target
    cache.next_position = length


def clone_cache(cache: PositionedCache, device: str | torch.device | None = None) -> PositionedCache:
    """A copy holding exactly the cached tokens (capacity = their count), with the same positions, on
    `device` (default: where the cache is)."""
    length = cache_length(cache)
    copy = PositionedCache(max(length, 1), cache.inv_freq, cache.attention_scaling)
    for layer_index, (keys, values) in enumerate(cache.layer_tensors()):
        copy.update(keys.to(device, copy=True), values.to(device, copy=True), layer_index)
    copy.records = Records(*(t.clone() for t in cache.records))
    copy.next_position = cache.next_position
    return copy


def recover_provenance(keys: torch.Tensor | None, keys_before: torch.Tensor | None, before: Provenance | None) -> Provenance:
    """Provenance of a cache built elsewhere from an earlier cache's tokens: each token (layer-0 key row,
    [1, heads, n, dim]) is matched bitwise, in order, to a token of the earlier cache (`keys_before`,
    `before`); tokens that match none (new or re-rotated keys) are unknown."""
    count = 0 if keys is None else keys.shape[2]
    result = Provenance.of(count)
    if count == 0 or keys_before is None or before is None:
        return result
    flat_before = keys_before[0].transpose(0, 1).reshape(keys_before.shape[2], -1).cpu().float()  # exact for bf16/fp16
    flat = keys[0].transpose(0, 1).reshape(count, -1).cpu().float()
    where: dict[bytes, list[int]] = {}
    for index in range(flat_before.shape[0]):
        where.setdefault(flat_before[index].numpy().tobytes(), []).append(index)
    last = -1
    for index in range(count):
        candidates = [i for i in where.get(flat[index].numpy().tobytes(), []) if i > last]
        if candidates:
            last = candidates[0]
            for name, target in zip(Provenance._fields, result):
                target[index] = getattr(before, name)[last]
    return result


# ---- merging: fewer tokens that stand for more -------------------------------------------------------


def merge_tokens(cache: PositionedCache, groups: Sequence[torch.Tensor] | torch.Tensor,
                 weights: Sequence[torch.Tensor] | torch.Tensor | None = None) -> None:
    """Replace the cached tokens by one token per group, the same groups in every layer and head (in place):
    group j (ascending cache slots) becomes token j; slots in no group are dropped. Groups are disjoint and
    listed by ascending first slot; `weights` (one non-negative weight per member; default: equal) are
    normalised within each group. The groups may come padded already ([count, width] with -1 after the members,
    weights with 0), as pad_groups gives them. The rules are merge_tokens_per_head's."""
    if isinstance(groups, torch.Tensor):
        members, member_weights = groups, (groups >= 0).double() if weights is None else weights
    else:
        members, member_weights = pad_groups(groups, weights)
    _merge(cache, members, member_weights)


def merge_tokens_per_head(cache: PositionedCache, members: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    """Replace the cached tokens of layer l and KV head h by one token per group members[l, h, j] (in place).

    members: long [layers, kv_heads, count, width], cache slots, each group ascending and padded with -1 after
    its members; in each (layer, head) the groups are disjoint and listed by ascending first slot, and every
    layer and head has `count` of them (the buffers stay rectangular). weights: [layers, kv_heads, count,
    width], non-negative, normalised within each group (a group whose weights sum to 0 is averaged equally).
    A kv_heads dimension of 1 gives every head of a layer the same groups (one set per layer), without
    expanding them over the heads; the heads of each layer must then hold the same tokens.

    A group of one token keeps it bitwise (key, value, query, records). A larger group becomes the weighted
    average of its members: keys are stored after RoPE, so each member's key is rotated back to position 0
    (RoPE undone), the average is taken there in float32 and rotated to the group's first member's position
    (rotation is linear, so this is the key the averaged pre-RoPE key would have there); values carry no
    position and are averaged as they are; recorded pre-RoPE queries, if any, are averaged likewise. The
    merged token's records are its first member's position, kind and frame, the members' patch index when
    they share one (else -1), and `merged` = the sum of theirs. next_position is left as it is (the caller
    applies its position mode)."""
    _merge(cache, members, weights)


def pad_groups(groups: Sequence[Sequence[int] | torch.Tensor], weights: Sequence[Sequence[float] | torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups of slots (and their weights) as one [count, width] tensor padded with -1 (weights with 0)."""
    lists = [group.tolist() if isinstance(group, torch.Tensor) else list(group) for group in groups]
    width = max((len(group) for group in lists), default=1)
    members = torch.tensor([group + [-1] * (width - len(group)) for group in lists], dtype=torch.long).view(len(lists), width)
    if weights is None:
        return members, (members >= 0).double()
    values = [weight.tolist() if isinstance(weight, torch.Tensor) else list(weight) for weight in weights]
    padded = torch.tensor([value + [0.0] * (width - len(value)) for value in values], dtype=torch.float64).view(len(lists), width)
    return members, padded


def _check_groups(members: torch.Tensor, weights: torch.Tensor, length: int) -> None:
    valid = members >= 0
    if members.shape[-1] == 0 or not bool(valid[..., 0].all()) or not bool((valid[..., 1:] <= valid[..., :-1]).all()):
        raise ValueError("merge_tokens: every group needs a first member and its padding (-1) after its members")
    if members.numel() and int(members.max()) >= length:
        raise ValueError(f"merge_tokens: a slot out of range for a cache of {length} tokens")
    if not bool(((members[..., 1:] > members[..., :-1]) | ~valid[..., 1:]).all()):
        raise ValueError("merge_tokens: each group's slots must be strictly ascending")
    if not bool((members[..., 1:, 0] > members[..., :-1, 0]).all()):
        raise ValueError("merge_tokens: groups must be listed by strictly ascending first slot")
    rows = members.reshape(-1, members.shape[-2] * members.shape[-1])  # one row of slots per (layer, head)
    uses = torch.zeros(rows.shape[0], length + 1, dtype=torch.int32)  # column `length`: the padding
    uses.scatter_add_(1, torch.where(rows >= 0, rows, length), torch.ones_like(rows, dtype=torch.int32))
    if bool((uses[:, :length] > 1).any()):
        raise ValueError("merge_tokens: a slot belongs to two groups")
    if weights.shape != members.shape or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("merge_tokens: weights must be finite, non-negative and shaped like the groups")


def _merge(cache: PositionedCache, members: torch.Tensor, weights: torch.Tensor | None) -> None:
    """merge_tokens_per_head on members [count, width] (every layer and head) or [layers, kv_heads, count, width]."""
    length = cache_length(cache)
    layers = [layer for layer in cache.layers if layer.is_initialized]
    members = members.to(torch.long).cpu()
    valid = members >= 0
    weights = valid.double() if weights is None else weights.cpu().to(torch.float64)
    per_head = members.dim() == 4
    heads = layers[0].key_buffer.shape[1] if layers else 1
    if members.dim() not in (2, 4) or per_head and layers and (members.shape[0] != len(layers) or members.shape[1] not in (1, heads)):
        raise ValueError(f"merge_tokens: groups of shape {tuple(members.shape)}, not [count, width] or [layers, kv_heads, count, width]")
    _check_groups(members, weights, length)
    if cache.per_head and not per_head:  # shared groups on a cache whose heads hold different tokens
        members, valid, weights = (t.expand(len(layers), heads, *t.shape) for t in (members, valid, weights))
        per_head = True
    weights = torch.where(valid, weights, 0.0)
    total = weights.sum(dim=-1, keepdim=True)
    weights = torch.where(total > 0, weights / torch.where(total > 0, total, 1.0), valid.double() / valid.sum(dim=-1, keepdim=True))
    index = members.clamp(min=0)
    records = cache.records.expanded(len(layers), heads) if per_head else cache.records
    per_layer = per_head and members.shape[1] == 1 and heads > 1  # one set per layer, broadcast over its heads
    if per_layer:
        if cache.per_head and not all(bool((t == t[:, :1]).all()) for t in records):  # positions alone may agree (contiguous)
            raise ValueError("merge_tokens: one set of groups per layer, but the heads of a layer hold different tokens")
        records = Records(*(t[:, :1] for t in records))

    def take(values: torch.Tensor) -> torch.Tensor:  # a record of each member: [..., count, width]
        if not per_head:
            return values[..., index]
        return torch.gather(values, -1, index.flatten(-2)).view(index.shape)

    positions = take(records.positions)  # [count, width], or [layers, kv_heads, count, width]
    patches = take(records.patches)
    same_patch = ((patches == patches[..., :1]) | ~valid).all(dim=-1)
    cache_records = Records(
        positions[..., 0].clone(), take(records.kinds)[..., 0].clone(), take(records.frames)[..., 0].clone(),
        torch.where(same_patch, patches[..., 0], -1), (take(records.merged) * valid).sum(dim=-1),
    )
    if per_layer:
        cache_records = Records(*(t.expand(-1, heads, -1).contiguous() for t in cache_records))
    several = valid[..., 1:].any(dim=-1) if members.shape[-1] > 1 else torch.zeros(valid.shape[:-1], dtype=torch.bool)
    if bool(several.any()) and cache.inv_freq is None:
        raise ValueError("merge_tokens: merging keys needs the model's RoPE inv_freq on the cache")
    for layer_index, layer in enumerate(layers):
        pick = (lambda t: t[layer_index]) if per_head else (lambda t: t[None])  # [kv_heads or 1, count, ...]
        _merge_layer(layer, length, pick(index), pick(valid), pick(weights), pick(positions), pick(several), cache.inv_freq)
    cache.records = cache_records


def _merge_layer(layer: BufferLayer, length: int, index: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor,
                 positions: torch.Tensor, several: torch.Tensor, inv_freq: torch.Tensor | None) -> None:
    """One layer of _merge: index, valid, weights, positions [kv_heads, count, width]; several [kv_heads, count]
    (a first dimension of 1: the same groups in every head)."""
    device = layer.key_buffer.device
    heads, count = layer.key_buffer.shape[1], index.shape[1]
    columns = torch.nonzero(several.any(dim=0)).flatten()  # the groups of more than one token in some head
    width = int(valid[:, columns].sum(dim=-1).max()) if len(columns) else 1
    first = index[..., 0].to(device)
    sub = index[:, columns, :width].to(device)  # [heads, merged, width]
    sub_weights = weights[:, columns, :width]
    sub_several = several[:, columns].to(device)

    def gather(buffer: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:  # buffer [b, heads, cap, d], slots [heads, m]
        batch, dim = buffer.shape[0], buffer.shape[-1]
        return torch.gather(buffer[:, :, :length], 2, slots[None, :, :, None].expand(batch, heads, slots.shape[-1], dim))

    for buffer, rotate in ((layer.key_buffer, True), (layer.value_buffer, False)):
        result = gather(buffer, first)  # every group's first member, bitwise
        if len(columns):
            compute = torch.float64 if buffer.dtype == torch.float64 else torch.float32
            grouped = gather(buffer, sub.flatten(1)).to(compute)  # [b, heads, merged * width, d]
            if rotate:
                grouped = rerotate(grouped, -positions[:, columns, :width].flatten(1), inv_freq)
            shape = (buffer.shape[0], heads, len(columns), width, buffer.shape[-1])
            mean = (grouped.view(shape) * sub_weights.to(device, compute)[None, ..., None]).sum(dim=3)
            if rotate:
                mean = rerotate(mean, positions[:, columns, 0], inv_freq)
            result[:, :, columns] = torch.where(sub_several[None, :, :, None], mean.to(buffer.dtype), result[:, :, columns])
        buffer[:, :, :count] = result
    if layer.query_buffer is not None:  # [cap, query heads * dim]; the query heads of KV head h are contiguous
        queries = layer.query_buffer[:length].view(length, heads, -1)
        head = torch.arange(heads, device=device)
        result = queries[first.T, head[None, :]]  # [count, heads, group * dim]
        if len(columns):
            compute = torch.float64 if queries.dtype == torch.float64 else torch.float32
            grouped = queries[sub.permute(1, 2, 0), head[None, None, :]].to(compute)  # [merged, width, heads, group * dim]
            mean = (grouped * sub_weights.permute(1, 2, 0).to(device, compute)[..., None]).sum(dim=1)
            result[columns] = torch.where(sub_several.T[..., None], mean.to(queries.dtype), result[columns])
        layer.query_buffer[:count] = result.reshape(count, -1)
    layer.length = count
