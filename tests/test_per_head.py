"""Selection per (layer, KV head) as the papers define it (docs/strategies.md): SnapKV and KnormPress keep a
set per layer and head, TOVA one per layer. Each strategy's kept slots are checked against a keep set
computed here, head by head, with numpy loops over the raw tensors; attention after the reduction is
attention over exactly those keys; the orphan rule's fixpoint and the protected system prompt on
hand-worked caches; the per-head stream in the trace and results."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prospect.cache import KIND, PositionedCache, Provenance, cache_length, clone_cache, crop_end
from prospect.context_strategies import STRATEGIES, create_strategy
from prospect.context_strategies.budget import BudgetKeep
from prospect.stream.runner import StreamRunner
from prospect.stream.settings import StreamSettings
from prospect.tracking.results import stream_metrics
from tests.test_zoo import SMALL, constructed_cache, greedy_keep, rope, strategy_on

PREFIX, BUDGET = 6, 30


def kept_per_head(cache: PositionedCache, before_positions: torch.Tensor) -> list[list[list[int]]]:
    """Slots of the cache before the reduction kept in each (layer, head), found by their unique positions."""
    after = cache.head_records().positions
    kept = []
    for layer in range(after.shape[0]):
        row = []
        for head in range(after.shape[1]):
            slot_of = {int(p): i for i, p in enumerate(before_positions[layer, head])}
            row.append([slot_of[int(p)] for p in after[layer, head]])
        kept.append(row)
    return kept


def hand_keep(kinds: list[int], frames: list[int], scores: np.ndarray, window: int, budget: int) -> list[int]:
    """The prefix, then the window (slot order) and the others by descending score (ties: the older slot),
    taken greedily under the orphan rule (tests/test_zoo.py::greedy_keep)."""
    length = len(kinds)
    window_slots = list(range(length - window, length))
    pool = sorted(range(PREFIX, length - window), key=lambda s: (-scores[s], s))
    return list(range(PREFIX)) + greedy_keep(kinds, frames, window_slots + pool, budget, protected=window)


def key_norm_scores(cache: PositionedCache) -> np.ndarray:
    """-||k|| per layer, KV head and slot, in float64."""
    keys = [layer.keys[0].numpy().astype(np.float64) for layer in cache.layers]
    return np.array([[[-math.sqrt(sum(x * x for x in keys[l][h, s])) for s in range(keys[l].shape[1])]
                      for h in range(keys[l].shape[0])] for l in range(len(keys))])


def window_attention_scores(cache: PositionedCache, window: int, kernel: int) -> np.ndarray:
    """SnapKV's score per layer and KV head: the attention each slot receives from the window's queries
    (rotated to their positions), summed over the queries, averaged over the KV head's query group, then
    max-pooled over the slots before the window."""
    length = cache_length(cache)
    inv_freq = cache.inv_freq.numpy().astype(np.float64)
    positions = cache.positions.tolist()
    out = []
    for layer in cache.layers:
        keys = layer.keys[0].numpy().astype(np.float64)
        queries = layer.query_buffer[:length].numpy().astype(np.float64).reshape(length, -1, keys.shape[-1])
        group = queries.shape[1] // keys.shape[0]
        per_head = []
        for head in range(keys.shape[0]):
            received = np.zeros(length)
            for q_head in range(head * group, head * group + group):
                for slot in range(length - window, length):
                    q = rope(queries[slot, q_head], positions[slot], inv_freq)
                    logits = np.array([q @ keys[head, j] / math.sqrt(len(q)) for j in range(slot + 1)])
                    weights = np.exp(logits - logits.max())
                    received[: slot + 1] += weights / weights.sum() / group
            edge = length - window
            pooled = [received[max(0, i - kernel // 2): min(edge, i + kernel // 2 + 1)].max() for i in range(edge)]
            per_head.append(np.array(pooled + list(received[edge:])))
        out.append(per_head)
    return np.array(out)


CASES = {  # strategy, its parameters, the hand score per (layer, head), and how its keep sets are shared
    "key_norm": ({"window": 5}, lambda cache: key_norm_scores(cache), "per_head"),
    "snapkv": ({"window": 4, "kernel": 3}, lambda cache: window_attention_scores(cache, 4, 3), "per_head"),
    "tova": ({}, lambda cache: window_attention_scores(cache, 1, 1), "per_layer"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_kept_slots_of_every_layer_and_head_are_the_papers_keep_sets(name):
    params, hand_scores, selection = CASES[name]
    cache = constructed_cache(layers=3, heads=2, q_heads=4)
    kinds, frames = cache.kinds.tolist(), cache.frames.tolist()
    scores = hand_scores(cache)  # [layers, kv_heads, length]
    if selection == "per_layer":  # TOVA: the layer's heads averaged, one set for all of them
        scores = np.repeat(scores.mean(axis=1, keepdims=True), scores.shape[1], axis=1)
    window = params.get("window", 1)
    expected = [[hand_keep(kinds, frames, scores[l, h], window, BUDGET) for h in range(scores.shape[1])] for l in range(scores.shape[0])]
    before = cache.head_records().positions.clone()
    original = clone_cache(cache)
    strategy = strategy_on(name, cache, last_keep_len=BUDGET, **params)
    assert strategy.selection == selection  # the paper's selection is the default
    strategy.handle_overflow(cache, None)
    assert cache.per_head and kept_per_head(cache, before) == expected
    if selection == "per_head":
        assert any(row[0] != row[1] for row in expected)  # the heads of a layer chose differently
    else:
        assert all(row[0] == row[1] for row in expected) and expected[0][0] != expected[1][0]  # per layer
    # attention after the reduction is attention over exactly the kept keys and values, in every (layer, head)
    generator = torch.Generator().manual_seed(1)
    for l, (layer, old) in enumerate(zip(cache.layers, original.layers)):
        for h in range(layer.keys.shape[1]):
            index = torch.tensor(expected[l][h])
            assert torch.equal(layer.keys[0, h], old.keys[0, h, index]) and torch.equal(layer.values[0, h], old.values[0, h, index])
            query = torch.randn(layer.keys.shape[-1], generator=generator)
            reduced = torch.softmax(layer.keys[0, h] @ query, dim=0) @ layer.values[0, h]
            direct = torch.softmax(old.keys[0, h, index] @ query, dim=0) @ old.values[0, h, index]
            assert torch.equal(reduced, direct)


def test_shared_selection_keeps_one_set_for_every_layer_and_head():
    cache = constructed_cache(layers=3, heads=2, q_heads=4)
    kinds, frames = cache.kinds.tolist(), cache.frames.tolist()
    scores = key_norm_scores(cache).mean(axis=1).mean(axis=0)
    strategy = strategy_on("key_norm", cache, last_keep_len=BUDGET, window=5, selection="shared")
    before = cache.positions.clone()
    strategy.handle_overflow(cache, None)
    assert not cache.per_head
    assert [int(p) for p in cache.positions] == [int(before[s]) for s in hand_keep(kinds, frames, scores, 5, BUDGET)]


def test_contiguous_positions_rerotate_each_heads_own_keys():
    cache = constructed_cache(layers=2, heads=2, q_heads=4)
    original = clone_cache(cache)
    before = cache.positions.clone()
    strategy = strategy_on("key_norm", cache, last_keep_len=BUDGET, window=5, position_mode="contiguous")
    strategy.handle_overflow(cache, None)
    length = cache_length(cache)
    assert (cache.head_records().positions == torch.arange(length)).all() and cache.next_position == length
    inv_freq = cache.inv_freq.numpy().astype(np.float64)
    scores = key_norm_scores(original)
    kinds, frames = original.kinds.tolist(), original.frames.tolist()
    for l in range(2):
        for h in range(2):
            kept = hand_keep(kinds, frames, scores[l, h], 5, BUDGET)
            for slot, source in enumerate(kept):
                key = original.layers[l].keys[0, h, source].numpy().astype(np.float64)
                expected = rope(key, slot - int(before[source]), inv_freq)  # RoPE composes: rotate by the shift
                assert np.allclose(cache.layers[l].keys[0, h, slot].numpy(), expected, atol=1e-5)


def test_a_second_reduction_selects_within_each_heads_own_tokens():
    """After a per-head reduction, new tokens are appended to every head; the next reduction scores and
    keeps per head among that head's own tokens (its records say which)."""
    cache = constructed_cache(layers=2, heads=2, q_heads=4)
    strategy = strategy_on("key_norm", cache, last_keep_len=BUDGET, window=5)
    strategy.handle_overflow(cache, None)
    generator = torch.Generator().manual_seed(3)
    count = 12
    cache.take_positions(count, Provenance.of(count, KIND["assistant"]))
    for l in range(2):
        cache.update(torch.randn(1, 2, count, 8, generator=generator), torch.randn(1, 2, count, 8, generator=generator), l)
    cache.check()
    records = cache.head_records()
    assert cache.frame_tokens_per_head().tolist() == ((records.kinds == KIND["image"]) | (records.kinds == KIND["frame_text"])).sum(-1).tolist()
    crop_end(cache, 2)  # the talk probe's crop: the per-head part stays, the appended tail shrinks
    assert all(torch.equal(a, b[..., :-2]) for a, b in zip(cache.head_records(), records)) and cache.next_position == int(records.positions[0, 0, -2])
    records = cache.head_records()
    before = records.positions.clone()
    kinds, frames = records.kinds, records.frames
    scores = key_norm_scores(cache)
    strategy.handle_overflow(cache, None)
    for l in range(2):
        for h in range(2):
            expected = hand_keep(kinds[l, h].tolist(), frames[l, h].tolist(), scores[l, h], 5, BUDGET)
            assert kept_per_head(cache, before)[l][h] == expected


def one_head_cache(norms: list[float], kinds: list[int], frames: list[int]) -> PositionedCache:
    """One layer, one KV head, 2-d keys whose L2 norms are `norms`."""
    count = len(norms)
    cache = PositionedCache(count, inv_freq=torch.ones(1), query_width=2)
    cache.take_positions(count, Provenance(torch.tensor(kinds, dtype=torch.int8), torch.tensor(frames), torch.full((count,), -1)))
    keys = torch.tensor([[n, 0.0] for n in norms])[None, None]
    cache.update(keys, torch.zeros_like(keys), 0)
    return cache


def test_orphan_rule_reaches_a_fixpoint_on_the_hand_worked_case():
    """Frame A = text (norm 1) + 2 images (norm 10), frame B = text (2) + image (3); key_norm keeps the lowest
    norms, budget 2, window 0. The earlier rule dropped both texts as orphans for good and refilled with B's
    image and one of A's: two images without their text, while the whole frame B (text 2 + image 3) was
    passed over. The fixpoint keeps frame B whole: B's text waits until B's image is taken, then enters."""
    text, image = KIND["frame_text"], KIND["image"]
    cache = one_head_cache([1, 10, 10, 2, 3], [text, image, image, text, image], [0, 0, 0, 1, 1])
    strategy = create_strategy("key_norm", max_seq_len=16, reserved_seq_len=1, last_keep_len=2, window=0, selection="shared")
    strategy.start_stream(prompt_len=0)
    strategy.handle_overflow(cache, None)
    assert cache.positions.tolist() == [3, 4]  # B's text and image
    assert cache.kinds.tolist() == [text, image] and cache.frames.tolist() == [1, 1]


def test_frame_text_in_the_window_is_kept_even_when_its_images_are_not():
    """The window (last `window` tokens) is kept whole; the orphan rule applies only before it. Slots: image of
    frame 0 (norm 10), two images of frame 1 (2, 3), frame 0's text (1), an assistant token (1); key_norm keeps
    the lowest norms, budget 3, window 2: the window (slots 3, 4) and slot 1. Frame 0's text stays although
    frame 0's image goes (before, it waited for that image and was lost to slot 2)."""
    text, image = KIND["frame_text"], KIND["image"]
    cache = one_head_cache([10, 2, 3, 1, 1], [image, image, image, text, KIND["assistant"]], [0, 1, 1, 0, -1])
    strategy = create_strategy("key_norm", max_seq_len=16, reserved_seq_len=1, last_keep_len=3, window=2, selection="shared")
    strategy.start_stream(prompt_len=0)
    strategy.handle_overflow(cache, None)
    assert cache.positions.tolist() == [1, 3, 4]


def budget_strategies() -> list[str]:
    return [name for name, cls in STRATEGIES.items() if issubclass(cls, BudgetKeep) and name != "streaming_llm"]


@pytest.mark.parametrize("name", budget_strategies())
def test_the_system_prompt_is_protected_before_an_initial_cache_exists(name):
    """Before ProAssist's initial cache exists, every budget strategy keeps the system prompt (prompt_len
    tokens) and chooses within last_keep_len after it; key_norm would otherwise evict these high-norm keys
    first. (drop_middle drops everything there, as ProAssist; streaming_llm keeps its sink_len first tokens.)"""
    cache = constructed_cache(layers=2, heads=2, q_heads=4)
    for layer in cache.layers:
        layer.key_buffer[:, :, :PREFIX] *= 100.0  # the system prompt's keys: the largest norms
    before = cache.head_records().positions.clone()
    strategy = create_strategy(name, **{**SMALL, "max_seq_len": 256, "reserved_seq_len": 8, "last_keep_len": 40})
    strategy.start_stream(prompt_len=PREFIX)
    assert strategy.init_kv_cache is None
    strategy.handle_overflow(cache, None)
    positions = cache.head_records().positions
    assert (positions[..., :PREFIX] == before[..., :PREFIX]).all()
    assert cache_length(cache) <= PREFIX + 40


def test_per_head_stream_reports_the_frame_share_spread(tiny_model, synthetic_conversations):
    conversation = synthetic_conversations[0]
    per_head = StreamRunner(tiny_model, create_strategy("key_norm", **SMALL), StreamSettings(max_new_tokens=6))
    shared = StreamRunner(tiny_model, create_strategy("key_norm", **SMALL, selection="shared"), StreamSettings(max_new_tokens=6))
    a, b = per_head.run(conversation), shared.run(conversation)
    assert per_head.cache.per_head and not shared.cache.per_head
    ranged = [r for r in a.trace if "cache_frame_tokens_range" in r]
    assert ranged and all(low <= r["cache_frame_tokens"] <= high for r in ranged for low, high in [r["cache_frame_tokens_range"]])
    assert not any("cache_frame_tokens_range" in r for r in b.trace)
    assert stream_metrics([b.trace], 0.0)["cache_frame_share_spread"] == 0.0
    spread = stream_metrics([a.trace], 0.0)["cache_frame_share_spread"]
    expected = np.mean([(r["cache_frame_tokens_range"][1] - r["cache_frame_tokens_range"][0]) / r["cache_after"]
                        if "cache_frame_tokens_range" in r else 0.0 for r in a.trace])
    assert spread == pytest.approx(expected) and spread > 0  # the heads held different shares of frames


def test_an_unknown_selection_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"^selection=per_token: choose one of: shared, per_layer, per_head$"):
        create_strategy("snapkv", selection="per_token")
