"""The streaming-video strategies `simple_stream` (SimpleStream) and `streaming_vlm` (StreamingVLM) on real
tensors: kept slots, positions and provenance of a reduction worked out by hand on a constructed cache, the
one-line errors of their keys, and real streams of the tiny SmolVLM2 (fp32, CPU): eager = optimized under
both talk policies in every position mode, each lane = its job alone, and their windows held at every step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prospect.cache import KIND, PositionedCache, Provenance, cache_length
from prospect.context_strategies import create_strategy
from prospect.stream.lanes import LaneRunner
from prospect.stream.runner import StreamRunner
from prospect.stream.settings import StreamSettings
from prospect.validation import ConfigError, check_command_line
from tests.test_lanes import assert_each_lane_equals_its_job_alone

S, U, A, T, I = KIND["system"], KIND["user"], KIND["assistant"], KIND["frame_text"], KIND["image"]
GAP = 37  # positions skipped after the prefix (as after an earlier reduction in original mode)
PREFIX = 3


def frame(k: int) -> list[tuple[int, int]]:
    """One constructed frame k: frame text, two image tokens, frame text."""
    return [(T, k), (I, k), (I, k), (T, k)]


def text(kind: int, count: int) -> list[tuple[int, int]]:
    return [(kind, -1)] * count


def build_cache(layout: list[tuple[int, int]], layers: int = 2, heads: int = 2, dim: int = 8) -> PositionedCache:
    """A cache holding `layout` ((kind, frame) per slot; the first PREFIX slots are the prompt) with random
    keys and values; positions 0..PREFIX-1, then GAP skipped: slot s >= PREFIX is at position s + GAP."""
    generator = torch.Generator().manual_seed(0)
    kinds = torch.tensor([kind for kind, _ in layout], dtype=torch.int8)
    frames = torch.tensor([f for _, f in layout])
    patches = torch.full((len(layout),), -1)
    for frame in set(frames.tolist()) - {-1}:  # image tokens get their patch index within their frame
        image = (frames == frame) & (kinds == KIND["image"])
        patches[image] = torch.arange(int(image.sum()))
    cache = PositionedCache(len(layout) + 8, inv_freq=1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))
    cache.take_positions(PREFIX, Provenance(kinds[:PREFIX], frames[:PREFIX], patches[:PREFIX]))
    cache.next_position += GAP
    cache.take_positions(len(layout) - PREFIX, Provenance(kinds[PREFIX:], frames[PREFIX:], patches[PREFIX:]))
    for layer in range(layers):
        shape = (1, heads, len(layout), dim)
        cache.update(torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator), layer)
    return cache


def reduce_and_compare(cache: PositionedCache, strategy, kept: list[int], kinds: list[int], frames: list[int], **context):
    """Reduce `cache` with `strategy` and compare with the hand-worked kept slots and provenance: positions
    (original: the kept tokens' own; contiguous: 0..n-1, keys re-rotated by the shift; cache_length: their
    own, the next token at n), values bitwise."""
    before_keys = [k.clone().numpy().astype(np.float64) for k, _ in cache.layer_tensors()]
    before_values = [v.clone() for _, v in cache.layer_tensors()]
    before_patches = cache.patches.clone()
    old = [s if s < PREFIX else s + GAP for s in kept]  # the kept tokens' positions before
    next_before = cache.next_position
    strategy.start_stream(prompt_len=PREFIX)
    strategy.handle_overflow(cache, None, **context)
    n = len(kept)
    assert cache_length(cache) == n
    assert cache.kinds.tolist() == kinds and cache.frames.tolist() == frames
    assert cache.patches.tolist() == before_patches[kept].tolist()  # patch indices travel with their tokens
    assert cache.merged.tolist() == [1] * n  # whole-token strategies merge nothing
    index = torch.tensor(kept)
    for (keys, values), k0, v0 in zip(cache.layer_tensors(), before_keys, before_values):
        assert torch.equal(values, v0[:, :, index])
        if strategy.position_mode == "contiguous":
            inv_freq = cache.inv_freq.numpy().astype(np.float64)
            for j, (slot, position) in enumerate(zip(kept, old)):
                for head in range(keys.shape[1]):
                    expected = rope(k0[0, head, slot], j - position, inv_freq)
                    assert np.allclose(keys[0, head, j].numpy(), expected, atol=1e-5)
        else:
            assert np.array_equal(keys.numpy(), k0[:, :, kept])
    if strategy.position_mode == "contiguous":
        assert cache.positions.tolist() == list(range(n)) and cache.next_position == n
    elif strategy.position_mode == "cache_length":
        assert cache.positions.tolist() == old and cache.next_position == n
    else:  # original: new tokens continue at the running counter
        assert cache.positions.tolist() == old and cache.next_position == next_before


def rope(x: np.ndarray, delta: float, inv_freq: np.ndarray) -> np.ndarray:
    """A post-RoPE key moved by `delta` positions (rotate_half convention), written out."""
    half = len(x) // 2
    out = np.empty_like(x)
    for i in range(half):
        angle = delta * inv_freq[i]
        out[i] = x[i] * math.cos(angle) - x[i + half] * math.sin(angle)
        out[i + half] = x[i + half] * math.cos(angle) + x[i] * math.sin(angle)
    return out


# ---- simple_stream, by hand ------------------------------------------------------------------------------

# slots: 0-2 system | 3 user | 4-7 frame 10 | 8-9 assistant | 10 user | 11-14 frame 11 | 15-16 assistant |
#        17-20 frame 12 | 21 assistant
SIMPLE = text(S, 3) + text(U, 1) + frame(10) + text(A, 2) + text(U, 1) + frame(11) + text(A, 2) + frame(12) + text(A, 1)


@pytest.mark.parametrize("mode", ["original", "contiguous", "cache_length"])
def test_simple_stream_keeps_the_prefix_the_newest_frames_minus_one_and_their_span(mode):
    # frames=3: the newest 2 frames (11, 12) stay; the span starts at frame 11's first token (slot 11), so the
    # user turn at 10 and everything before it after the prefix go
    strategy = create_strategy("simple_stream", max_seq_len=256, reserved_seq_len=8, last_keep_len=64, frames=3, position_mode=mode)
    kept = [0, 1, 2] + list(range(11, 22))
    kinds = [S, S, S, T, I, I, T, A, A, T, I, I, T, A]
    frames = [-1, -1, -1, 11, 11, 11, 11, -1, -1, 12, 12, 12, 12, -1]
    reduce_and_compare(build_cache(SIMPLE), strategy, kept, kinds, frames)


@pytest.mark.parametrize("frames,last_keep_len,kept,kinds,frame_of", [
    (1, 64, [0, 1, 2, 21], [S, S, S, A], [-1, -1, -1, -1]),  # no frame kept: the dialogue after the newest frame
    # the span 11..21 (11 tokens) cut to its newest 8 (14..21) splits frame 11: it goes whole
    (3, 8, [0, 1, 2] + list(range(15, 22)), [S, S, S, A, A, T, I, I, T, A], [-1, -1, -1, -1, -1, 12, 12, 12, 12, -1]),
    # more frames asked than cached: all three, from frame 10's first token (the user turn at slot 3 goes)
    (9, 64, [0, 1, 2] + list(range(4, 22)), [S, S, S, T, I, I, T, A, A, U, T, I, I, T, A, A, T, I, I, T, A],
     [-1, -1, -1] + [10] * 4 + [-1] * 3 + [11] * 4 + [-1] * 2 + [12] * 4 + [-1]),
])
def test_simple_stream_edge_windows_and_the_budget_cut(frames, last_keep_len, kept, kinds, frame_of):
    strategy = create_strategy("simple_stream", max_seq_len=256, reserved_seq_len=8, last_keep_len=last_keep_len, frames=frames,
                               position_mode="original")
    reduce_and_compare(build_cache(SIMPLE), strategy, kept, kinds, frame_of)


def test_simple_stream_reduces_once_the_window_is_full():
    """It reduces once the cache holds `frames` frames after the prefix (counted from the cache's records),
    or at the shared threshold."""
    strategy = create_strategy("simple_stream", max_seq_len=256, reserved_seq_len=8, last_keep_len=64, frames=3)
    strategy.start_stream(prompt_len=PREFIX)
    two = build_cache(text(S, PREFIX) + frame(0) + text(U, 2) + frame(1) + text(A, 1))
    three = build_cache(text(S, PREFIX) + frame(0) + text(U, 2) + frame(1) + text(A, 1) + frame(2))
    assert not strategy.should_reduce(two) and strategy.should_reduce(three)
    strategy.handle_overflow(three, None)
    assert not strategy.should_reduce(three)  # 2 frames kept: the next frame completes the window
    strategy.start_stream(prompt_len=PREFIX + 5)  # frame 0 in the prompt prefix does not count
    assert not strategy.should_reduce(build_cache(text(S, PREFIX) + frame(0) + text(U, 1) + frame(1) + frame(2)))
    nine = create_strategy("simple_stream", max_seq_len=32, reserved_seq_len=8, frames=9, last_keep_len=16)
    nine.start_stream(prompt_len=PREFIX)
    assert nine.should_reduce(build_cache(text(S, PREFIX) + text(U, 21)))  # the threshold (24 tokens), no frame


# ---- streaming_vlm, by hand ------------------------------------------------------------------------------

# stream at 2 fps: frame k at (k + 1) / 2 s. slots: 0-2 system | 3-6 frame 0 | 7-8 user | 9-12 frame 1 |
#   13-15 assistant | 16-19 frame 2 | 20 user | 21-24 frame 3 | 25-26 assistant | 27-30 frame 4 | 31-34 frame 5 | 35 assistant
VLM = (text(S, 3) + frame(0) + text(U, 2) + frame(1) + text(A, 3) + frame(2) + text(U, 1) + frame(3) + text(A, 2)
       + frame(4) + frame(5) + text(A, 1))
NOW = dict(frame_index=5, time=3.0)  # the reduction's context: the current frame and its time


@pytest.mark.parametrize("mode", ["original", "contiguous", "cache_length"])
def test_streaming_vlm_keeps_the_text_sink_the_recent_text_and_the_recent_frames_in_the_budget(mode):
    # dialogue after the prefix: 7 8 13 14 15 20 25 26 35. Sink 2: 7, 8; recent text 3: 25, 26, 35 -> 5 tokens.
    # 1.5 s at 2 fps = 3 frames in view (5 - k < 3: frames 3, 4, 5); room 14 - 5 = 9: frames 5 and 4 (8 tokens),
    # frame 3 does not fit
    strategy = create_strategy("streaming_vlm", max_seq_len=256, reserved_seq_len=8, last_keep_len=14, text_sink=2, text_window=3,
                               vision_seconds=1.5, position_mode=mode)
    kept = [0, 1, 2, 7, 8, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35]
    kinds = [S, S, S, U, U, A, A, T, I, I, T, T, I, I, T, A]
    frames = [-1] * 7 + [4] * 4 + [5] * 4 + [-1]
    reduce_and_compare(build_cache(VLM), strategy, kept, kinds, frames, **NOW)


def test_streaming_vlm_time_window_and_without_a_time():
    # room 40 - 5 = 35: the time window (frames 3, 4, 5) is the limit, frame 2 is 1.5 s old
    strategy = create_strategy("streaming_vlm", max_seq_len=256, reserved_seq_len=8, last_keep_len=40, text_sink=2, text_window=3,
                               vision_seconds=1.5, position_mode="original")
    kept = [0, 1, 2, 7, 8] + list(range(21, 35)) + [35]
    kinds = [S, S, S, U, U, T, I, I, T, A, A, T, I, I, T, T, I, I, T, A]
    frames = [-1] * 5 + [3] * 4 + [-1, -1] + [4] * 4 + [5] * 4 + [-1]
    reduce_and_compare(build_cache(VLM), strategy, kept, kinds, frames, **NOW)
    # called without the stream's time, the budget is the only limit: all six frames (24 tokens) fit in 35;
    # the middle dialogue (13 14 15 20) goes
    kept = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 17, 18, 19] + list(range(21, 36))
    kinds = [S, S, S, T, I, I, T, U, U, T, I, I, T, T, I, I, T, T, I, I, T, A, A, T, I, I, T, T, I, I, T, A]
    frames = [-1] * 3 + [0] * 4 + [-1] * 2 + [1] * 4 + [2] * 4 + [3] * 4 + [-1] * 2 + [4] * 4 + [5] * 4 + [-1]
    reduce_and_compare(build_cache(VLM), strategy, kept, kinds, frames)
    # sink and window larger than the dialogue: all 9 dialogue tokens; 1 s in view at 3 fps would be 3 frames,
    # at 2 fps (the stream's) 2: frames 4 and 5
    strategy = create_strategy("streaming_vlm", max_seq_len=256, reserved_seq_len=8, last_keep_len=40, text_sink=6, text_window=6,
                               vision_seconds=1.0, position_mode="original")
    kept = [0, 1, 2, 7, 8, 13, 14, 15, 20, 25, 26] + list(range(27, 36))
    kinds = [S, S, S, U, U, A, A, A, U, A, A, T, I, I, T, T, I, I, T, A]
    frames = [-1] * 11 + [4] * 4 + [5] * 4 + [-1]
    reduce_and_compare(build_cache(VLM), strategy, kept, kinds, frames, **NOW)


def test_streaming_vlm_window_in_frames_from_the_stream_time():
    strategy = create_strategy("streaming_vlm", vision_seconds=16.0)
    assert strategy.first_frame_in_view(100, 50.5) == 69  # 2 fps: 32 frames, 69..100
    assert strategy.first_frame_in_view(100, 101 / 3) == 53  # 3 fps: 48 frames (16 * 3 rounds to 48.000000x)
    assert strategy.first_frame_in_view(10, 5.5) == -21  # the whole stream so far
    assert strategy.first_frame_in_view(None, None) is None


# ---- bad parameters: one line naming the key ------------------------------------------------------------

BAD = [
    (["strategy=simple_stream", "strategy.frames=0"], "strategy.frames=0: must be >= 1"),
    (["strategy=simple_stream", "strategy.frames=2.5"], "strategy.frames=2.5: must be an integer"),
    (["strategy=simple_stream", "strategy.last_keep_len=4000"], "last_keep_len + reserved_seq_len (4128) must be < max_seq_len (4096)"),
    (["strategy=streaming_vlm", "strategy.text_sink=-1"], "strategy.text_sink=-1: must be >= 0"),
    (["strategy=streaming_vlm", "strategy.text_window=-3"], "strategy.text_window=-3: must be >= 0"),
    (["strategy=streaming_vlm", "strategy.vision_seconds=0"], "strategy.vision_seconds=0: must be > 0"),
    (["strategy=streaming_vlm", "strategy.vision_seconds=-2.5"], "strategy.vision_seconds=-2.5: must be > 0"),
    (["strategy=streaming_vlm", "strategy.last_keep_len=24"], "strategy.text_window=16: text_sink + text_window (32) must be <= last_keep_len (24)"),
    (["strategy=streaming_vlm", "strategy.text_sink=500", "strategy.text_window=100"],
     "strategy.text_window=100: text_sink + text_window (600) must be <= last_keep_len (512)"),
]


@pytest.mark.parametrize("argv,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_parameters_fail_in_one_line_naming_the_key(argv, expected):
    with pytest.raises(ConfigError) as raised:
        check_command_line(argv)
    assert expected in str(raised.value)
    assert "\n" not in str(raised.value)


# ---- real streams (tiny SmolVLM2, fp32, CPU) -------------------------------------------------------------

PARAMS = {
    # reduces at its window (3 frames of 32 tokens after the prefix), far below the threshold
    "simple_stream": dict(max_seq_len=1024, reserved_seq_len=32, last_keep_len=256, frames=3),
    # 1 s in view at 2 fps: at most 2 frames; text 48 of the 128
    "streaming_vlm": dict(max_seq_len=384, reserved_seq_len=32, last_keep_len=128, text_sink=16, text_window=32, vision_seconds=1.0),
}
POLICIES = {"gt_turns": {}, "threshold": {"talk_policy": "threshold", "talk_threshold": 2.1e-5}}
SLOW_THRESHOLD = ["gt_turns", pytest.param("threshold", marks=pytest.mark.slow)]  # the default run stays short; CI runs both


def frames_after(kinds: torch.Tensor, frames: torch.Tensor, prefix: int) -> list[int]:
    return sorted(set(frames[prefix:][kinds[prefix:] == I].tolist()))


def watched_stream(model, name, conversation, optimized, policy, **params):
    """Run one stream; record each reduction (records before and after, context) and, at every forward, the
    frames after the prefix in view."""
    strategy = create_strategy(name, **{**PARAMS[name], **params})
    reductions, in_view = [], []
    original = strategy.handle_overflow

    def handle_overflow(cache, last_msg, **context):
        before = {"kinds": cache.kinds.clone(), "frames": cache.frames.clone(), "positions": cache.positions.clone(), "prefix": strategy.prefix_len()}
        cache, last_msg = original(cache, last_msg, **context)
        after = {"kinds": cache.kinds.clone(), "frames": cache.frames.clone(), "positions": cache.positions.clone()}
        reductions.append((before, after, context["frame_index"], context["time"]))
        return cache, last_msg

    strategy.handle_overflow = handle_overflow
    runner = StreamRunner(model, strategy, StreamSettings(max_new_tokens=6, optimized=optimized, **POLICIES[policy]))
    runner.on_forward = lambda *call: in_view.append(len(frames_after(runner.cache.kinds, runner.cache.frames, strategy.prefix_len())))
    result = runner.run(conversation)
    return strategy, runner, result, reductions, in_view


def check_reduction(name, strategy, before, after, frame_index, time):
    prefix = before["prefix"]
    n = len(after["kinds"])
    assert n <= prefix + strategy.last_keep_len  # equal memory
    assert torch.equal(after["kinds"][:prefix], before["kinds"][:prefix])  # the prefix whole
    kept = frames_after(after["kinds"], after["frames"], prefix)
    for k in set(after["frames"][prefix:].tolist()) - {-1}:  # whole frames: every token of a kept frame, no orphan text
        assert k in kept and int((after["frames"] == k).sum()) == int((before["frames"] == k).sum())
    cached = frames_after(before["kinds"], before["frames"], prefix)
    dialogue_before = int((before["frames"][prefix:] == -1).sum())
    dialogue_after = int((after["frames"][prefix:] == -1).sum())
    if name == "simple_stream":  # the newest frames - 1, and the dialogue from the oldest kept frame on
        assert kept == cached[len(cached) - min(len(cached), strategy.frames - 1):]
    else:  # the vision window in stream time (fps 2), the newest frames first; the text budgets
        fps = (frame_index + 1) / time
        assert all(frame_index - k < strategy.vision_seconds * fps for k in kept)
        assert kept == cached[len(cached) - len(kept):]
        assert dialogue_after == min(dialogue_before, strategy.text_sink + strategy.text_window)
    if strategy.position_mode == "contiguous":
        assert after["positions"].tolist() == list(range(n))
    elif strategy.position_mode == "original":  # positions are unique: map each kept token back, provenance with it
        slot = {int(p): i for i, p in enumerate(before["positions"])}
        index = torch.tensor([slot[int(p)] for p in after["positions"]])
        assert torch.equal(after["kinds"], before["kinds"][index]) and torch.equal(after["frames"], before["frames"][index])


@pytest.mark.parametrize("mode", ["original", "contiguous", "cache_length"])
@pytest.mark.parametrize("policy", SLOW_THRESHOLD)
@pytest.mark.parametrize("name", list(PARAMS))
def test_stream_windows_hold_and_optimized_equals_eager(tiny_model, synthetic_conversations, name, policy, mode):
    conversation = synthetic_conversations[0]
    strategy, runner, eager, reductions, in_view = watched_stream(tiny_model, name, conversation, False, policy, position_mode=mode)
    _, fast_runner, fast, fast_reductions, fast_view = watched_stream(tiny_model, name, conversation, True, policy, position_mode=mode)
    assert len(reductions) == len(fast_reductions) >= 3
    assert eager.replies == fast.replies and in_view == fast_view
    assert [r["events"] for r in eager.trace] == [r["events"] for r in fast.trace]
    for (b1, a1, *_), (b2, a2, *_) in zip(reductions, fast_reductions):
        assert all(torch.equal(a1[key], a2[key]) for key in a1)
    for name_, a, b in zip(runner.cache.records._fields, runner.cache.records, fast_runner.cache.records):
        assert torch.equal(a, b), name_
    for before, after, frame_index, time in reductions:
        check_reduction(name, strategy, before, after, frame_index, time)
    if name == "simple_stream":  # the model never sees more than `frames` frames after the prefix
        assert max(in_view) == strategy.frames
        assert all(r["cache_max"] < strategy.ctxlen_to_reduce for r in eager.trace)  # the window, not the threshold, reduced
    if policy == "threshold":
        probed = [r for r in eager.trace if "not_talk_probability" in r]
        assert 0 < len(eager.replies) < len(probed)  # silent at some frames (the probe cropped), spoke at others


@pytest.mark.parametrize("policy", SLOW_THRESHOLD)
def test_each_lane_equals_its_job_alone(tiny_model, synthetic_conversations, policy):
    settings = StreamSettings(max_new_tokens=8, optimized=True, **POLICIES[policy])
    strategies = [create_strategy(name, **params) for name, params in PARAMS.items()]
    strategies += [create_strategy("simple_stream", **{**PARAMS["streaming_vlm"], "frames": 2, "position_mode": "original"}),
                   create_strategy("streaming_vlm", **{**PARAMS["streaming_vlm"], "position_mode": "cache_length"}),
                   create_strategy("simple_stream", **{**PARAMS["simple_stream"], "position_mode": "cache_length"}),
                   create_strategy("drop_middle", max_seq_len=448, reserved_seq_len=32, last_keep_len=128)]
    lanes = LaneRunner(tiny_model, strategies, settings)
    for conversation in synthetic_conversations[: 2 if policy == "gt_turns" else 1]:
        together = assert_each_lane_equals_its_job_alone(tiny_model, lanes, settings, conversation)
        assert all(any("compress" in r["events"] for r in result.trace) for result in together[:3])
