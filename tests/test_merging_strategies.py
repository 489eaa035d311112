"""The merging strategies `frame_merge` (StreamBridge) and `streammem` (StreamMem) and the cache operation they
share (prospect.cache.merge_tokens): merged keys and values against a numpy computation of RoPE undone,
averaged and redone; groups of one kept bitwise; slots, positions, provenance and merged counts of
reductions worked out by hand; real streams of the tiny SmolVLM2 (fp32, CPU): eager = optimized, each lane =
its job alone, the equal budget, text first and no orphan frame text at every reduction."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from prospect.cache import (KIND, PositionedCache, Provenance, cache_length, keep_tokens, make_contiguous, merge_tokens,
                            merge_tokens_per_head)
from prospect.context_strategies import create_strategy
from prospect.models.chat_format import SMOLVLM
from prospect.stream.lanes import LaneRunner
from prospect.stream.settings import StreamSettings
from prospect.validation import ConfigError, check_command_line
from tests.test_lanes import assert_each_lane_equals_its_job_alone
from tests.test_zoo import SMALL, constructed_cache, rope, stream_with_checks, strategy_on

S, U, A, T, I = KIND["system"], KIND["user"], KIND["assistant"], KIND["frame_text"], KIND["image"]
GAP = 37  # constructed_cache: slot s >= 6 sits at position s + GAP


def snapshot(cache: PositionedCache) -> dict:
    """Keys, values ([layers, kv_heads, n, dim]) and queries ([layers, n, width]) in float64, and the records
    as [layers, kv_heads, n]."""
    keys = np.stack([k[0].double().numpy() for k, _ in cache.layer_tensors()])
    values = np.stack([v[0].double().numpy() for _, v in cache.layer_tensors()])
    length = cache_length(cache)
    queries = np.stack([layer.query_buffer[:length].double().numpy() for layer in cache.layers])
    return {"keys": keys, "values": values, "queries": queries, **{k: v.clone() for k, v in cache.head_records()._asdict().items()}}


def expected_token(before: dict, layer: int, head: int, members: list[int], weights: list[float], inv_freq: np.ndarray):
    """The merged key, value and query rows (of KV head `head`'s query heads) by hand: weights normalised, keys
    rotated back by their positions, averaged, rotated to the first member's position."""
    w = np.array(weights, dtype=np.float64) / np.sum(weights)
    positions = before["positions"][layer, head]
    key = sum(wi * rope(before["keys"][layer, head, m], -float(positions[m]), inv_freq) for wi, m in zip(w, members))
    key = rope(key, float(positions[members[0]]), inv_freq)
    value = sum(wi * before["values"][layer, head, m] for wi, m in zip(w, members))
    group = before["queries"].shape[-1] // before["keys"].shape[1]
    query = sum(wi * before["queries"][layer, m, head * group : (head + 1) * group] for wi, m in zip(w, members))
    return key, value, query


def check_merged(cache: PositionedCache, before: dict, groups_of, weights_of) -> None:
    """Every (layer, head) of `cache` holds, in order, the merge of groups_of(layer, head) with weights_of(...):
    groups of one bitwise, the others to float32 rounding of the numpy computation."""
    after = snapshot(cache)
    inv_freq = cache.inv_freq.double().numpy()
    layers, heads = after["keys"].shape[:2]
    group = after["queries"].shape[-1] // heads
    for layer in range(layers):
        for head in range(heads):
            for j, (members, weights) in enumerate(zip(groups_of(layer, head), weights_of(layer, head))):
                rows = slice(head * group, (head + 1) * group)
                if len(members) == 1:
                    for name in ("keys", "values"):
                        assert np.array_equal(after[name][layer, head, j], before[name][layer, head, members[0]])
                    assert np.array_equal(after["queries"][layer, j, rows], before["queries"][layer, members[0], rows])
                    continue
                key, value, query = expected_token(before, layer, head, members, weights, inv_freq)
                np.testing.assert_allclose(after["keys"][layer, head, j], key, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(after["values"][layer, head, j], value, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(after["queries"][layer, j, rows], query, rtol=1e-5, atol=1e-5)


# ---- the cache operation --------------------------------------------------------------------------------


def test_groups_of_one_keep_their_tokens_bitwise_as_keep_tokens_does():
    cache, twin = constructed_cache(), constructed_cache()
    slots = [0, 3, 7, 8, 20, 41, 63]
    merge_tokens(cache, [torch.tensor([s]) for s in slots])
    keep_tokens(twin, torch.tensor(slots))
    assert not cache.per_head and cache_length(cache) == len(slots) and cache.next_position == twin.next_position
    for name, a, b in zip(cache.records._fields, cache.records, twin.records):
        assert torch.equal(a, b), name
    for (k1, v1), (k2, v2) in zip(cache.layer_tensors(), twin.layer_tensors()):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    for l1, l2 in zip(cache.layers, twin.layers):
        assert torch.equal(l1.query_buffer[: len(slots)], l2.query_buffer[: len(slots)])


def test_a_merged_token_is_the_weighted_mean_with_rope_undone_and_redone_at_its_first_position():
    # constructed_cache: prefix 0-5 (system); frame 10: user 6-7, text 8-10, images 11-14 (patches 0-3), text 15;
    # frame 11: text 16-18, images 19-22, text 23; frame 12: assistant 24-25, text 26-28, images 29-32, ...
    cache = constructed_cache()
    before = snapshot(cache)
    groups = [[0], [6], [11, 19], [12, 13, 22], [29]]
    weights = [[1.0], [1.0], [1.0, 3.0], [0.5, 0.25, 0.25], [7.0]]
    merge_tokens(cache, [torch.tensor(g) for g in groups], [torch.tensor(w) for w in weights])
    assert cache_length(cache) == 5 and not cache.per_head
    assert cache.positions.tolist() == [0, 6 + GAP, 11 + GAP, 12 + GAP, 29 + GAP]  # each group's first member's
    assert cache.kinds.tolist() == [S, U, I, I, I]
    assert cache.frames.tolist() == [-1, -1, 10, 10, 12]
    assert cache.patches.tolist() == [-1, -1, 0, -1, 0]  # patch 0 twice: 0; patches 1, 2, 3: none
    assert cache.merged.tolist() == [1, 1, 2, 3, 1]
    check_merged(cache, before, lambda l, h: groups, lambda l, h: weights)
    before = snapshot(cache)  # merging merged tokens adds their counts
    merge_tokens(cache, [torch.tensor([0]), torch.tensor([2, 3, 4])])
    assert cache.merged.tolist() == [1, 6] and cache.positions.tolist() == [0, 11 + GAP] and cache.patches.tolist() == [-1, -1]
    check_merged(cache, before, lambda l, h: [[0], [2, 3, 4]], lambda l, h: [[1.0], [1.0, 1.0, 1.0]])


def test_per_head_groups_give_per_head_records_and_each_head_its_own_merge():
    cache = constructed_cache(layers=3, heads=2, q_heads=4)
    before = snapshot(cache)

    def groups(layer, head):  # 4 groups in every (layer, head), different ones
        return [[0], [1 + layer, 9 + head], [11 + head, 12 + head + layer, 30], [40 + 2 * layer + head]]

    def weights(layer, head):
        return [[1.0], [1.0 + head, 2.0], [1.0, 0.0, 2.0 + layer], [1.0]]

    members = torch.full((3, 2, 4, 3), -1)
    member_weights = torch.zeros(3, 2, 4, 3, dtype=torch.float64)
    for layer in range(3):
        for head in range(2):
            for j, (g, w) in enumerate(zip(groups(layer, head), weights(layer, head))):
                members[layer, head, j, : len(g)] = torch.tensor(g)
                member_weights[layer, head, j, : len(w)] = torch.tensor(w)
    merge_tokens_per_head(cache, members, member_weights)
    assert cache.per_head and cache_length(cache) == 4
    records = cache.head_records()
    for layer in range(3):
        for head in range(2):
            g = groups(layer, head)
            assert records.positions[layer, head].tolist() == [int(before["positions"][layer, head, m[0]]) for m in g]
            assert records.merged[layer, head].tolist() == [1, 2, 3, 1]
            assert records.kinds[layer, head].tolist() == [int(before["kinds"][layer, head, m[0]]) for m in g]
    check_merged(cache, before, groups, weights)
    before = snapshot(cache)
    merge_tokens(cache, [torch.tensor([0]), torch.tensor([1, 2, 3])])  # shared groups on a per-head cache
    assert cache.head_records().merged.tolist() == [[[1, 6]] * 2] * 3
    check_merged(cache, before, lambda l, h: [[0], [1, 2, 3]], lambda l, h: [[1.0], [1.0, 1.0, 1.0]])


def test_one_set_per_layer_equals_the_same_groups_given_to_every_head():
    """members [layers, 1, count, width] (streammem's per-layer sets, not expanded over the heads) give bitwise
    the cache that the same groups repeated for every head give; on a cache whose heads of a layer hold
    different tokens they are refused."""
    members = torch.full((3, 1, 4, 3), -1)
    weights = torch.zeros(3, 1, 4, 3, dtype=torch.float64)
    for layer in range(3):
        for j, (g, w) in enumerate(zip([[0], [1 + layer, 9], [11, 12 + layer, 30], [40 + 2 * layer]],
                                       [[1.0], [1.0, 2.0], [1.0, 0.5, 2.0 + layer], [1.0]])):
            members[layer, 0, j, : len(g)], weights[layer, 0, j, : len(w)] = torch.tensor(g), torch.tensor(w)
    broadcast, expanded = constructed_cache(layers=3, heads=2, q_heads=4), constructed_cache(layers=3, heads=2, q_heads=4)
    merge_tokens_per_head(broadcast, members, weights)
    merge_tokens_per_head(expanded, members.expand(-1, 2, -1, -1), weights.expand(-1, 2, -1, -1))
    assert broadcast.per_head and cache_length(broadcast) == 4
    for name, mine, theirs in zip(broadcast.records._fields, broadcast.head_records(), expanded.head_records()):
        assert mine.shape == (3, 2, 4) and torch.equal(mine, theirs), name
    for (k1, v1), (k2, v2) in zip(broadcast.layer_tensors(), expanded.layer_tensors()):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    for mine, theirs in zip(broadcast.layers, expanded.layers):
        assert torch.equal(mine.query_buffer[:4], theirs.query_buffer[:4])
    heads_differ = constructed_cache(layers=3, heads=2, q_heads=4)
    per_head = torch.tensor([[[[0], [1], [2], [3]], [[0], [1], [2], [8]]]] * 3)  # head 0 keeps a system token, head 1 frame text
    merge_tokens_per_head(heads_differ, per_head)
    make_contiguous(heads_differ)  # the same positions 0..3 in every head: only the other records tell the heads apart
    assert torch.equal(heads_differ.head_records().positions[:, 0], heads_differ.head_records().positions[:, 1])
    with pytest.raises(ValueError, match="heads of a layer hold different tokens"):
        merge_tokens_per_head(heads_differ, torch.tensor([[[[0], [1]]]] * 3))


@pytest.mark.parametrize("groups,weights,message", [
    ([[1, 2], [0]], None, "ascending first slot"),
    ([[0, 2], [0, 3]], None, "ascending first slot"),
    ([[0, 3], [2, 3]], None, "two groups"),  # interleaved groups are fine ([[0, 2], [1, 3]]), shared slots are not
    ([[3, 1]], None, "strictly ascending"),
    ([[0], [99]], None, "out of range"),
    ([[0, 1]], [[1.0, -1.0]], "non-negative"),
])
def test_bad_groups_are_refused(groups, weights, message):
    cache = constructed_cache()
    with pytest.raises(ValueError, match=message):
        merge_tokens(cache, [torch.tensor(g) for g in groups], None if weights is None else [torch.tensor(w) for w in weights])


# ---- frame_merge by hand ----------------------------------------------------------------------------------

# constructed_cache(frames=4): prefix 0-5; frame 10: user 6-7, text 8-10, images 11-14, text 15; frame 11: text
# 16-18, images 19-22, text 23; frame 12: assistant 24-25, text 26-28, images 29-32, text 33; frame 13: text
# 34-36, images 37-40, text 41. After the prefix: 4 dialogue tokens and 4 frames of 8 tokens.
F0_TEXT, F2_TEXT = [8, 9, 10, 15], [26, 27, 28, 33]
PAIR_01 = [[11 + p, 19 + p] for p in range(4)]  # patch p of frame 10 with patch p of frame 11
PAIR_23 = [[29 + p, 37 + p] for p in range(4)]
ROUND_2 = [[11 + p, 19 + p, 29 + p, 37 + p] for p in range(4)]


@pytest.mark.parametrize("budget,groups", [
    (36, None),  # everything fits: nothing changes
    (28, [[6], [7], *[[s] for s in F0_TEXT[:3]], *PAIR_01, [15], [24], [25], *[[s] for s in range(26, 42)]]),  # one pair
    (26, [[6], [7], *[[s] for s in F0_TEXT[:3]], *PAIR_01, [15], [24], [25], *[[s] for s in F2_TEXT[:3]], *PAIR_23, [33]]),
    (14, [[6], [7], *[[s] for s in F0_TEXT[:3]], *ROUND_2, [15], [24], [25]]),  # a second round
    (9, [[6], [7], [24], [25]]),  # one frame of 8 left for a room of 5: dropped
    (3, [[7], [24], [25]]),  # dialogue alone exceeds the budget: its newest tokens
])
def test_frame_merge_pairs_adjacent_frames_oldest_first_round_by_round(budget, groups):
    cache = constructed_cache(frames=4)
    before = snapshot(cache)
    strategy_on("frame_merge", cache, last_keep_len=budget).handle_overflow(cache, None)
    if groups is None:
        assert cache_length(cache) == 42 and cache.merged.tolist() == [1] * 42
        return
    groups = [[s] for s in range(6)] + sorted(groups)
    assert cache_length(cache) == len(groups) <= 6 + budget
    first = [g[0] for g in groups]
    assert cache.positions.tolist() == [s if s < 6 else s + GAP for s in first]  # the older frame's positions
    assert cache.kinds.tolist() == before["kinds"][0, 0, first].tolist()
    assert cache.frames.tolist() == before["frames"][0, 0, first].tolist()  # the older frame's index and text
    assert cache.patches.tolist() == before["patches"][0, 0, first].tolist()  # patch p stays patch p
    assert cache.merged.tolist() == [len(g) for g in groups]
    check_merged(cache, before, lambda l, h: groups, lambda l, h: [[1.0] * len(g) for g in groups])


def test_frame_merge_weights_by_merged_count_and_handles_missing_partners():
    cache = constructed_cache(frames=4)
    cache.merged = torch.tensor([1] * 11 + [3] + [1] * 30)  # slot 11 (frame 10, patch 0) already stands for 3 tokens
    keep_tokens(cache, torch.tensor([s for s in range(42) if s not in (13, 20)]))  # frame 10 lacks patch 2, frame 11 patch 1
    before = snapshot(cache)
    slot = {int(p): i for i, p in enumerate(before["positions"][0, 0])}  # old slot -> slot now, by position
    at = lambda *olds: [slot[s if s < 6 else s + GAP] for s in olds]  # noqa: E731
    strategy_on("frame_merge", cache, last_keep_len=28).handle_overflow(cache, None)
    # frames 10 and 11 merge: patch 0 (weights 3:1), patch 3; frame 10's patch 1 stays alone, frame 11's patch 2 too
    # (labelled frame 11, without frame 11's text). That leaves 4 + 8 + 16 tokens after the prefix for a room of
    # 24 + 4: frames 12 and 13 stay as they are.
    groups = [at(s) for s in range(8)] + [at(8), at(9), at(10), at(11, 19), at(12), at(14, 22), at(15), at(21)] + \
             [at(s) for s in range(24, 42)]
    groups = sorted(groups)
    assert cache_length(cache) == len(groups) == 6 + 28
    first = [g[0] for g in groups]
    assert cache.frames.tolist() == before["frames"][0, 0, first].tolist()
    assert cache.merged.tolist() == [int(before["merged"][0, 0, g].sum()) for g in groups]
    assert cache.kinds[cache.frames == 11].tolist() == [I]  # frame 11's text is gone, its lone patch stays
    weights = [[float(before["merged"][0, 0, s]) for s in g] for g in groups]
    check_merged(cache, before, lambda l, h: groups, lambda l, h: weights)


# ---- streammem by hand -------------------------------------------------------------------------------------

# slots: 0-1 system (the initial cache); frame 5: text 2, images 3-5; user 6-7; frame 6: text 8, images 9-11;
# frame 7: text 12, images 13-15; assistant 16.
LAYOUT = [(S, -1), (S, -1), (T, 5), (I, 5), (I, 5), (I, 5), (U, -1), (U, -1), (T, 6), (I, 6), (I, 6), (I, 6),
          (T, 7), (I, 7), (I, 7), (I, 7), (A, -1)]
SCORES = {  # what the assistant prompt's queries give each slot, per layer (frame tokens only matter)
    0: {13: .9, 14: .8, 9: .7, 12: .5, 3: .3, 4: .25, 10: .2, 11: .15, 15: .1, 8: .05, 2: .02, 5: .01},
    1: {3: .9, 4: .8, 5: .7, 2: .6, 9: .1, 10: .09, 11: .08, 13: .07, 14: .06, 15: .05, 8: .04, 12: .03},
}


def layout_cache(layers: int = 2, heads: int = 2, dim: int = 8) -> PositionedCache:
    generator = torch.Generator().manual_seed(1)
    kinds = torch.tensor([k for k, _ in LAYOUT], dtype=torch.int8)
    frames = torch.tensor([f for _, f in LAYOUT])
    patches = torch.tensor([-1, -1, -1, 0, 1, 2, -1, -1, -1, 0, 1, 2, -1, 0, 1, 2, -1])
    n = len(LAYOUT)
    cache = PositionedCache(n + 8, inv_freq=1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)), query_width=2 * heads * dim)
    cache.take_positions(2, Provenance(kinds[:2], frames[:2], patches[:2]))
    cache.next_position += GAP
    cache.take_positions(n - 2, Provenance(kinds[2:], frames[2:], patches[2:]))
    for layer in range(layers):
        shape = (1, heads, n, dim)
        cache.update(torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator), layer)
        cache.layers[layer].query_buffer[:n] = torch.randn(n, 2 * heads * dim, generator=generator)
    return cache


class PromptModel:
    """What streammem asks of the model: the chat format and a tokenizer (two ids for the assistant prompt)."""

    chat = SMOLVLM

    @staticmethod
    def encode(text: str) -> list[int]:
        assert text == SMOLVLM.assistant_prompt
        return [101, 102]


def streammem_reduce(cache: PositionedCache, budget: int, scores: dict = SCORES, **params) -> list:
    """Reduce with a probe whose measure is replaced by `scores` (the same in every head); returns its calls."""
    calls = []
    length = cache_length(cache)

    def probe(ids, measure):
        calls.append(ids)
        received = torch.zeros(2, 2, length + len(ids))
        for layer, row in scores.items():
            for slot, value in row.items():
                received[layer, :, slot] = value
        return received

    strategy = create_strategy("streammem", max_seq_len=64, reserved_seq_len=4, last_keep_len=budget, **params)
    strategy.start_stream(prompt_len=2)
    strategy.handle_overflow(cache, None, model=PromptModel(), probe=probe)
    return calls


@pytest.mark.parametrize("budget,params,per_layer", [
    # room 6 for frame tokens. Layer 0 takes 13, 14 (frame 7 has one evicted image left: no prototype), 9, frame
    # 7's text 12; then 3 would need 7 tokens. Frames 5 (3, 4, 5) and 6 (10, 11) fold into prototypes.
    # Layer 1 takes frame 5 whole (3, 4, 5, text 2); frames 6 and 7 fold; their texts go.
    (9, {}, {0: [[3, 4, 5], [9], [10, 11], [12], [13], [14]], 1: [[2], [3], [4], [5], [9, 10, 11], [13, 14, 15]]}),
    # pure eviction: the first 6 of each layer's order
    (9, {"merge": False}, {0: [[3], [4], [9], [12], [13], [14]], 1: [[2], [3], [4], [5], [9], [10]]}),
    # room 2 < 3 prototypes: the oldest frame (5) goes whole; frames 6 and 7 are one prototype each
    (5, {}, {0: [[9, 10, 11], [13, 14, 15]], 1: [[9, 10, 11], [13, 14, 15]]}),
    # dialogue (3 tokens) exceeds the budget: its newest 2, no frame token, no probe
    (2, {}, {0: [], 1: []}),
])
def test_streammem_keeps_the_most_attended_per_layer_and_folds_each_frames_rest(budget, params, per_layer):
    cache = layout_cache()
    before = snapshot(cache)
    calls = streammem_reduce(cache, budget, **params)
    assert calls == ([] if budget == 2 else [[101, 102]])
    dialogue = [[7], [16]] if budget == 2 else [[6], [7], [16]]
    groups = {layer: [[0], [1]] + sorted(frame_groups + dialogue) for layer, frame_groups in per_layer.items()}
    records = cache.head_records()
    assert cache_length(cache) == len(groups[0]) == 2 + min(budget, 9)
    for layer, layer_groups in groups.items():
        first = [g[0] for g in layer_groups]
        for head in range(2):
            assert records.positions[layer, head].tolist() == [s if s < 2 else s + GAP for s in first]
            assert records.kinds[layer, head].tolist() == before["kinds"][0, 0, first].tolist()
            assert records.frames[layer, head].tolist() == before["frames"][0, 0, first].tolist()
            assert records.merged[layer, head].tolist() == [len(g) for g in layer_groups]
            assert records.patches[layer, head].tolist() == [int(before["patches"][0, 0, g[0]]) if len(g) == 1 else -1
                                                             for g in layer_groups]

    def weights(layer, head):  # a prototype's members weighted by their scores
        return [[SCORES[layer].get(s, 1.0) for s in g] for g in groups[layer]]

    check_merged(cache, before, lambda l, h: groups[l], weights)


def test_streammem_shared_selection_keeps_one_set_scored_by_the_mean_over_layers():
    cache = layout_cache()
    streammem_reduce(cache, 9, selection="shared")
    # mean scores: 3 .6, 4 .525, 13 .485, 14 .43, 9 .4, 5 .355, 2 .31, 12 .265, 10 .145, ... Tokens held after
    # taking 0, 1, ... of that order: 3 (three prototypes), 4, 4, 5, 5, 6, 7: keep 3, 4, 13, 14, 9 for a room of 6;
    # frame 6's 10 and 11 fold, frame 5's 5 and frame 7's 15 (one evicted image each) and every frame text go.
    assert not cache.per_head
    first = [0, 1, 3, 4, 6, 7, 9, 10, 13, 14, 16]
    assert cache.positions.tolist() == [s if s < 2 else s + GAP for s in first]
    assert cache.merged.tolist() == [1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    assert cache.kinds.tolist() == [S, S, I, I, U, U, I, I, I, I, A]


def test_streammem_without_a_probe_scores_with_the_last_tokens_queries():
    """Without room for the probe (or a runner that offers none) the recorded queries of the last cached tokens,
    as many as the prompt has, stand in: the kept set is SnapKV's score with that window."""
    from prospect.context_strategies.snapkv import window_attention

    cache, twin = layout_cache(), layout_cache()
    received = window_attention(twin, 2).mean(dim=1)
    strategy = create_strategy("streammem", max_seq_len=64, reserved_seq_len=4, last_keep_len=9, selection="shared")
    strategy.start_stream(prompt_len=2)
    strategy.handle_overflow(cache, None, model=PromptModel(), probe=lambda ids, measure: None)
    mean = received.mean(dim=0)
    scores = {layer: {s: float(mean[s]) for s, (kind, _) in enumerate(LAYOUT) if kind in (T, I)} for layer in (0, 1)}
    streammem_reduce(twin, 9, scores, selection="shared")
    for a, b in zip(cache.records, twin.records):
        assert torch.equal(a, b)


# ---- keys ------------------------------------------------------------------------------------------------

BAD = [
    (["strategy=streammem", "strategy.selection=per_head"], "strategy.selection=per_head: choose one of: per_layer, shared"),
    (["strategy=streammem", "strategy.merge=3"], "strategy.merge=3"),
    (["strategy=streammem", "strategy.last_keep_len=4000"], "last_keep_len + reserved_seq_len (4128) must be < max_seq_len (4096)"),
    (["strategy=frame_merge", "strategy.last_keep_len=-1"], "last_keep_len=-1: must be >= 0"),
]


@pytest.mark.parametrize("argv,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_parameters_fail_in_one_line_naming_the_key(argv, expected):
    with pytest.raises(ConfigError) as raised:
        check_command_line(argv)
    assert expected in str(raised.value)
    assert "\n" not in str(raised.value)


# ---- real streams (tiny SmolVLM2, fp32, CPU) ------------------------------------------------------------

RECORDS = ("positions", "kinds", "frames", "patches", "merged")


def check_reduction(name: str, before_all: dict, after_all: dict) -> None:
    prefix = before_all["prefix"]
    assert after_all["length"] <= prefix + SMALL["last_keep_len"]  # the equal budget
    layers, heads = after_all["kinds"].shape[:2]
    for layer in range(layers):
        for head in range(heads):
            before = {key: before_all[key][layer, head] for key in RECORDS}
            after = {key: after_all[key][layer, head] for key in RECORDS}
            assert torch.equal(after["positions"][:prefix], before["positions"][:prefix])  # the initial cache stays
            assert bool((after["merged"] >= 1).all())
            if after_all["next"] > after_all["length"]:  # original positions: ascending, each a kept or first member's
                assert bool((after["positions"][1:] > after["positions"][:-1]).all())
                assert set(after["positions"].tolist()) <= set(before["positions"].tolist())
            kinds, frames = after["kinds"][prefix:], after["frames"][prefix:]
            with_image = frames[kinds == I]
            assert not bool(((kinds == T) & ~torch.isin(frames, with_image)).any())  # no orphan frame text
            dialogue = lambda k: int(((k != I) & (k != T)).sum())  # noqa: E731
            if dialogue(kinds) < dialogue(before["kinds"][prefix:]):
                assert not bool(((kinds == I) | (kinds == T)).any())  # text first
            image = lambda r: int(r["merged"][prefix:][r["kinds"][prefix:] == I].sum())  # noqa: E731
            assert image(after) <= image(before)  # a token never stands for more than there was
        if name == "streammem":  # one set per layer: its KV heads agree
            assert torch.equal(after_all["positions"][layer], after_all["positions"][layer, :1].expand(heads, -1))


@pytest.mark.parametrize("name,mode", [("frame_merge", "original"), ("streammem", "original"),
                                       ("frame_merge", "contiguous"), ("streammem", "cache_length")])
def test_streams_hold_the_budget_and_optimized_equals_eager(tiny_model, synthetic_conversations, name, mode):
    conversation = synthetic_conversations[0]
    _, runner, eager, calls = stream_with_checks(tiny_model, name, conversation, position_mode=mode)
    _, fast_runner, fast, fast_calls = stream_with_checks(tiny_model, name, conversation, optimized=True, position_mode=mode)
    assert len(calls) == len(fast_calls) >= 3
    assert eager.replies == fast.replies
    for (_, a), (_, b) in zip(calls, fast_calls):
        for key in RECORDS:
            assert torch.equal(a[key], b[key]), key
    for before, after in calls:
        check_reduction(name, before, after)
    assert any(bool((after["merged"] > 1).any()) for _, after in calls)  # tokens were merged
    assert runner.cache.per_head == (name == "streammem")
    if mode == "contiguous":
        assert all(bool((after["positions"] == torch.arange(after["length"])).all()) for _, after in calls)


POLICIES = {"gt_turns": {}, "threshold": {"talk_policy": "threshold", "talk_threshold": 2.1e-5}}
SLOW_THRESHOLD = ["gt_turns", pytest.param("threshold", marks=pytest.mark.slow)]  # the default run stays short; CI runs both


@pytest.mark.parametrize("policy", SLOW_THRESHOLD)
def test_each_lane_equals_its_job_alone(tiny_model, synthetic_conversations, policy):
    settings = StreamSettings(max_new_tokens=8, optimized=True, **POLICIES[policy])
    strategies = [create_strategy("frame_merge", **{**SMALL, "position_mode": "contiguous"}),  # each position mode in some lane
                  create_strategy("streammem", **SMALL),
                  create_strategy("streammem", **{**SMALL, "merge": False, "selection": "shared", "position_mode": "cache_length"}),
                  create_strategy("drop_middle", **{**SMALL, "max_seq_len": 448, "last_keep_len": 128})]
    lanes = LaneRunner(tiny_model, strategies, settings)
    for conversation in synthetic_conversations[:1]:
        together = assert_each_lane_equals_its_job_alone(tiny_model, lanes, settings, conversation)
        assert any("compress" in r["events"] for r in together[1].trace)
