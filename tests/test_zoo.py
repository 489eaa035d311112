"""The strategy zoo on real tensors: token provenance through every cache operation and stream step, each
strategy's kept set against an expectation computed here from the raw tensors, the equal budget, the
max_seq_len bound over several reductions, text first, eager = optimized, the seed API and the zoo grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prospect.cache import KIND, PositionedCache, Provenance, cache_length, crop_end, keep_spans, make_contiguous
from prospect.context_strategies import STRATEGIES, create_strategy
from prospect.context_strategies.frame_coverage import evenly_in_time
from prospect.stream.runner import StreamRunner
from prospect.stream.settings import StreamSettings

ZOO = ("streaming_llm", "drop_frames", "frame_coverage", "tar_van", "key_norm", "snapkv", "tova")
TEXT_FIRST = ("drop_frames", "frame_coverage", "tar_van")
SMALL = dict(max_seq_len=384, reserved_seq_len=32, last_keep_len=64)
FRAME_TEXT_HEAD, IMAGE, FRAME_TEXT_TAIL = 3, 4, 1  # tokens of one constructed frame


# ---- a constructed cache -------------------------------------------------------------------------


def constructed_cache(frames: int = 8, prefix: int = 6, layers: int = 3, heads: int = 2, q_heads: int = 4, dim: int = 8,
                      seed: int = 0) -> PositionedCache:
    """Prefix of system tokens, then per frame: a user or assistant turn of 2 tokens (every other frame),
    frame text, image tokens (patches 0..IMAGE-1), frame text. Random keys/values/queries; positions with a
    gap (as after an earlier drop_middle)."""
    generator = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    kinds, frame_of, patches = [KIND["system"]] * prefix, [-1] * prefix, [-1] * prefix
    for f in range(frames):
        if f % 2 == 0:
            kinds += [KIND["user"] if f % 4 == 0 else KIND["assistant"]] * 2
            frame_of += [-1, -1]
            patches += [-1, -1]
        kinds += [KIND["frame_text"]] * FRAME_TEXT_HEAD + [KIND["image"]] * IMAGE + [KIND["frame_text"]] * FRAME_TEXT_TAIL
        frame_of += [10 + f] * (FRAME_TEXT_HEAD + IMAGE + FRAME_TEXT_TAIL)
        patches += [-1] * FRAME_TEXT_HEAD + list(range(IMAGE)) + [-1] * FRAME_TEXT_TAIL
    length = len(kinds)
    cache = PositionedCache(length + 4, inv_freq=inv_freq, query_width=q_heads * dim)
    cache.take_positions(prefix, Provenance(torch.tensor(kinds[:prefix], dtype=torch.int8), torch.tensor(frame_of[:prefix]), torch.tensor(patches[:prefix])))
    cache.next_position += 37  # a gap
    cache.take_positions(length - prefix, Provenance(torch.tensor(kinds[prefix:], dtype=torch.int8), torch.tensor(frame_of[prefix:]), torch.tensor(patches[prefix:])))
    for layer in range(layers):
        cache.update(torch.randn(1, heads, length, dim, generator=generator), torch.randn(1, heads, length, dim, generator=generator), layer)
        cache.layers[layer].query_buffer[:length] = torch.randn(length, q_heads * dim, generator=generator)
    return cache


def strategy_on(name: str, cache: PositionedCache, prefix: int = 6, **params):
    strategy = create_strategy(name, **{"max_seq_len": 256, "reserved_seq_len": 8, **params})
    strategy.start_stream(prompt_len=prefix)
    if name != "streaming_llm":
        keep_spans_copy = PositionedCache(prefix)
        strategy.init_len, strategy.init_kv_cache = prefix, keep_spans_copy  # the prefix is the initial cache
    return strategy


def kept_slots(strategy, cache: PositionedCache) -> list[int]:
    """Run the reduction; return the kept slots of the cache before it (matched by the unique positions)."""
    before = cache.positions.tolist()
    strategy.handle_overflow(cache, None)
    slot_of = {p: i for i, p in enumerate(before)}
    return [slot_of[p] for p in cache.positions.tolist()] if strategy.position_mode != "contiguous" else None


def drop_orphans_by_hand(cache, ranked: list[int], count: int, fixed: list[int]) -> list[int]:
    """The orphan rule, written out as a plain greedy: the window (`fixed`) first, then `ranked`, until
    len(fixed) + count tokens are kept. An image token is taken; a frame_text token is taken once an image of
    its frame is kept, otherwise it waits and is taken right after the first image of its frame (in the
    order it was met), while room is left."""
    return greedy_keep(cache.kinds.tolist(), cache.frames.tolist(), fixed + ranked, len(fixed) + count)


def greedy_keep(kinds: list[int], frames: list[int], order: list[int], budget: int, protected: int = 0) -> list[int]:
    """Take `order` greedily up to `budget`; its first `protected` slots (the window) unconditionally, then frame
    text only once an image of its frame is taken (it waits for that image and enters right after it)."""
    kept: list[int] = []
    waiting: dict[int, list[int]] = {}
    with_image: set[int] = set()
    for taken, slot in enumerate(order):
        if len(kept) == budget:
            break
        if taken >= protected and kinds[slot] == KIND["frame_text"] and frames[slot] not in with_image:
            waiting.setdefault(frames[slot], []).append(slot)
            continue
        kept.append(slot)
        if kinds[slot] == KIND["image"] and frames[slot] not in with_image:
            with_image.add(frames[slot])
            for text in waiting.pop(frames[slot], []):
                if len(kept) < budget:
                    kept.append(text)
    return sorted(kept)


def rope(x: np.ndarray, position: float, inv_freq: np.ndarray) -> np.ndarray:
    """Llama's RoPE of one vector (rotate_half convention), written out."""
    half = len(x) // 2
    out = np.empty_like(x)
    for i in range(half):
        angle = position * inv_freq[i]
        out[i] = x[i] * math.cos(angle) - x[i + half] * math.sin(angle)
        out[i + half] = x[i + half] * math.cos(angle) + x[i] * math.sin(angle)
    return out


# ---- provenance through cache operations ----------------------------------------------------------


def test_provenance_stays_aligned_through_every_cache_operation():
    cache = constructed_cache()
    labels = list(zip(cache.positions.tolist(), cache.kinds.tolist(), cache.frames.tolist(), cache.patches.tolist()))
    by_position = {p: rest for p, *rest in labels}
    keep_spans(cache, [(0, 6), (20, 40), (50, 70)])
    assert [tuple(by_position[p]) for p in cache.positions.tolist()] == list(zip(cache.kinds.tolist(), cache.frames.tolist(), cache.patches.tolist()))
    crop_end(cache, 5)
    cache.check()
    assert [tuple(by_position[p]) for p in cache.positions.tolist()] == list(zip(cache.kinds.tolist(), cache.frames.tolist(), cache.patches.tolist()))
    kinds = cache.kinds.clone()
    make_contiguous(cache)
    assert torch.equal(cache.kinds, kinds) and cache.positions.tolist() == list(range(cache_length(cache)))
    cache.reset()
    cache.check()
    assert cache_length(cache) == 0 and len(cache.kinds) == len(cache.frames) == len(cache.patches) == 0


def test_query_buffer_moves_with_its_tokens():
    cache = constructed_cache()
    queries = cache.layers[1].query_buffer[: cache_length(cache)].clone()
    keep_spans(cache, [(0, 6), (30, 50)])
    assert torch.equal(cache.layers[1].query_buffer[:26], torch.cat([queries[:6], queries[30:50]]))


# ---- each strategy's kept set against an independent expectation --------------------------------


def test_streaming_llm_keeps_sinks_and_the_last_tokens():
    cache = constructed_cache()
    length = cache_length(cache)
    strategy = strategy_on("streaming_llm", cache, sink_len=4, last_keep_len=30, position_mode="original")
    assert kept_slots(strategy, cache) == list(range(4)) + list(range(length - 30, length))


def test_drop_frames_keeps_all_dialogue_then_the_newest_whole_frames():
    cache = constructed_cache()
    kinds, frames = cache.kinds.tolist(), cache.frames.tolist()
    length, budget = len(kinds), 40
    dialogue = [s for s in range(6, length) if kinds[s] not in (KIND["frame_text"], KIND["image"])]
    frame_ids = sorted({f for f in frames[6:] if f >= 0})
    size = FRAME_TEXT_HEAD + IMAGE + FRAME_TEXT_TAIL
    newest = frame_ids[len(frame_ids) - (budget - len(dialogue)) // size :]
    expected = sorted(list(range(6)) + dialogue + [s for s in range(6, length) if frames[s] in newest])
    assert kept_slots(strategy_on("drop_frames", cache, last_keep_len=budget), cache) == expected


def test_frame_coverage_spreads_whole_frames_evenly_newest_included():
    assert evenly_in_time(list(range(8)), 3) == [0, 3, 7]  # targets 0, 3.5, 7: the tie goes to the older frame
    assert evenly_in_time(list(range(8)), 1) == [7] and evenly_in_time(list(range(8)), 8) == list(range(8))
    assert evenly_in_time([0, 1, 2, 3, 30, 41, 42, 43], 3) == [0, 4, 7]  # by time (target 21.5 -> 30), not by list position
    cache = constructed_cache(frames=10)
    kinds, frames = cache.kinds.tolist(), cache.frames.tolist()
    dialogue = [s for s in range(6, len(kinds)) if kinds[s] not in (KIND["frame_text"], KIND["image"])]
    budget = len(dialogue) + 3 * 8 + 5  # room for 3 frames of 8 tokens
    picked = {10, 14, 19}  # frames 10..19, 3 in time: targets 10, 14.5 (tie: the older, 14), 19
    expected = sorted(list(range(6)) + dialogue + [s for s in range(6, len(kinds)) if frames[s] in picked])
    assert kept_slots(strategy_on("frame_coverage", cache, last_keep_len=budget), cache) == expected


def test_key_norm_keeps_the_window_and_the_lowest_key_norms():
    cache = constructed_cache()
    length, budget, window = cache_length(cache), 30, 5
    norms = np.zeros(length)
    layers = list(cache.layer_tensors())
    for keys, _ in layers:
        for slot in range(length):
            norms[slot] += np.mean([np.sqrt(np.sum(keys[0, h, slot].numpy().astype(np.float64) ** 2)) for h in range(keys.shape[1])])
    norms /= len(layers)
    pool = list(range(6, length - window))
    ranked = sorted(pool, key=lambda s: (norms[s], s))
    expected = list(range(6)) + drop_orphans_by_hand(cache, ranked, budget - window, list(range(length - window, length)))
    strategy = strategy_on("key_norm", cache, last_keep_len=budget, window=window, selection="shared")
    assert kept_slots(strategy, cache) == sorted(expected)


@pytest.mark.parametrize("window,kernel", [(4, 3), (1, 1)])  # window=1, kernel=1 is TOVA's criterion
def test_snapkv_keeps_the_tokens_most_attended_by_the_window(window, kernel):
    cache = constructed_cache()
    length, budget = cache_length(cache), 30
    inv_freq = cache.inv_freq.numpy().astype(np.float64)
    positions = cache.positions.tolist()
    received = np.zeros(length)
    for layer in cache.layers:
        keys = layer.keys[0].numpy().astype(np.float64)  # [kv_heads, length, dim]
        queries = layer.query_buffer[:length].numpy().astype(np.float64).reshape(length, -1, keys.shape[-1])
        q_heads = queries.shape[1]
        for h in range(q_heads):
            k = keys[h // (q_heads // keys.shape[0])]
            for slot in range(length - window, length):
                q = rope(queries[slot, h], positions[slot], inv_freq)
                logits = np.array([q @ k[j] / math.sqrt(len(q)) for j in range(slot + 1)])
                weights = np.exp(logits - logits.max())
                received[: slot + 1] += weights / weights.sum() / q_heads
    received /= len(cache.layers)
    edge = length - window  # pooled over the tokens before the window only
    pooled = np.array([received[max(0, i - kernel // 2) : min(edge, i + kernel // 2 + 1)].max() for i in range(edge)] + list(received[edge:]))
    pool = list(range(6, length - window))
    ranked = sorted(pool, key=lambda s: (-pooled[s], s))
    expected = list(range(6)) + drop_orphans_by_hand(cache, ranked, budget - window, list(range(length - window, length)))
    strategy = strategy_on("snapkv", cache, last_keep_len=budget, window=window, kernel=kernel, selection="shared")
    assert np.allclose(strategy.grouped_scores(cache)[0, 0].numpy(), pooled, atol=1e-6)
    assert kept_slots(strategy, cache) == sorted(expected)


def test_tar_van_protects_the_newest_frame_and_splits_images_by_redundancy_and_value_norm():
    cache = constructed_cache(frames=6)
    kinds, frames, patches = cache.kinds.tolist(), cache.frames.tolist(), cache.patches.tolist()
    length = len(kinds)
    inv_freq = cache.inv_freq.numpy().astype(np.float64)
    positions = cache.positions.tolist()
    layers = list(cache.layer_tensors())
    dialogue = [s for s in range(6, length) if kinds[s] not in (KIND["frame_text"], KIND["image"])]
    newest = max(frames)
    protected = [s for s in range(length) if frames[s] == newest]
    budget = len(dialogue) + len(protected) + 14
    image = [s for s in range(6, length) if kinds[s] == KIND["image"] and frames[s] != newest]

    def derotated(keys, slot, head):
        return rope(keys[0, head, slot].numpy().astype(np.float64), -positions[slot], inv_freq)

    tar, van = {}, {}
    for s in image:
        earlier = [t for t in range(s) if kinds[t] == KIND["image"] and patches[t] == patches[s]]
        van[s] = np.mean([np.mean([np.linalg.norm(v[0, h, s].numpy()) for h in range(v.shape[1])]) for _, v in layers])
        if earlier:
            t = earlier[-1]
            tar[s] = np.mean([np.mean([
                derotated(k, s, h) @ derotated(k, t, h) / np.linalg.norm(derotated(k, s, h)) / np.linalg.norm(derotated(k, t, h))
                for h in range(k.shape[1])]) for k, _ in layers])
    # choose image tokens by the rule, shrinking until their frames' text fits in the room left
    room = budget - len(dialogue) - len(protected)
    count = min(room, len(image))
    while count > 0:
        by_tar = sorted(tar, key=lambda s: (tar[s], image.index(s)))[: int(0.5 * count + 0.5)]
        rest = [s for s in image if s not in by_tar]
        by_van = sorted(rest, key=lambda s: (-van[s], image.index(s)))[: count - len(by_tar)]
        chosen = by_tar + by_van
        hit = {frames[s] for s in chosen}
        text = [s for s in range(6, length) if kinds[s] == KIND["frame_text"] and frames[s] in hit and frames[s] != newest]
        excess = count + len(text) - room
        if excess <= 0:
            break
        count -= max(1, excess // 2)
    expected = sorted(list(range(6)) + dialogue + protected + chosen + text)
    kept = kept_slots(strategy_on("tar_van", cache, last_keep_len=budget), cache)
    assert kept == expected
    assert len(kept) - 6 <= budget and len(chosen) >= 2  # single image tokens were kept, not whole frames


# ---- in a real stream (tiny SmolVLM2, fp32, CPU) ----------------------------------------------------


def stream_with_checks(model, name, conversation, optimized=False, talk_policy="gt_turns", talk_threshold=0.5, **params):
    strategy = create_strategy(name, **{**SMALL, **params})
    calls = []
    original = strategy.handle_overflow

    def records(cache):  # [layers, kv_heads, length] each, whether or not the cache is per head
        return {key: value.clone() for key, value in cache.head_records()._asdict().items()}

    def handle_overflow(cache, last_msg, **context):
        before = {**records(cache), "length": cache_length(cache),
                  "prefix": strategy.sink_len if name == "streaming_llm" else strategy.prefix_len()}
        cache, last_msg = original(cache, last_msg, **context)
        calls.append((before, {**records(cache), "length": cache_length(cache), "next": cache.next_position}))
        return cache, last_msg

    strategy.handle_overflow = handle_overflow
    runner = StreamRunner(model, strategy, StreamSettings(max_new_tokens=6, optimized=optimized, talk_policy=talk_policy, talk_threshold=talk_threshold))
    result = runner.run(conversation)
    return strategy, runner, result, calls


@pytest.mark.parametrize("name", ZOO)
def test_stream_budget_bound_alignment_text_first_and_optimized_path(tiny_model, synthetic_conversations, name):
    strategy, runner, result, calls = stream_with_checks(tiny_model, name, synthetic_conversations[0])
    _, _, fast, fast_calls = stream_with_checks(tiny_model, name, synthetic_conversations[0], optimized=True)
    assert len(calls) == len(fast_calls) >= 3
    for (_, a), (_, b) in zip(calls, fast_calls):  # the optimized path keeps the same tokens
        for key in ("positions", "kinds", "frames", "patches"):
            assert torch.equal(a[key], b[key])
    assert result.replies == fast.replies
    assert max(r["cache_max"] for r in result.trace) <= SMALL["max_seq_len"]
    for before_all, after_all in calls:
        prefix = before_all["prefix"]
        assert after_all["length"] <= prefix + SMALL["last_keep_len"]  # the equal budget
        layers, heads = before_all["kinds"].shape[:2]
        for layer in range(layers):
            for head in range(heads):  # every (layer, head) holds a valid keep set of its own
                before = {key: value[layer, head] for key, value in before_all.items() if key in RECORDS}
                after = {key: value[layer, head] for key, value in after_all.items() if key in RECORDS}
                check_keep_set(name, prefix, before, after)
    last = result.trace[-1]
    frame_tokens = runner.cache.frame_tokens_per_head().float()
    assert last["cache_frame_tokens"] == (float(frame_tokens.mean()) if runner.cache.per_head else int(frame_tokens[0, 0]))
    assert last["cache_frame_tokens"] + last["cache_dialogue_tokens"] == last["cache_after"]
    assert runner.cache.per_head == (name in ("key_norm", "snapkv", "tova"))  # selected per (layer, head) by default


RECORDS = ("positions", "kinds", "frames", "patches", "merged")


def check_keep_set(name, prefix, before, after):
    if name != "streaming_llm":  # original positions are unique: map every kept token back
        slot = {int(p): i for i, p in enumerate(before["positions"])}
        index = torch.tensor([slot[int(p)] for p in after["positions"]])
        for key in ("kinds", "frames", "patches"):
            assert torch.equal(after[key], before[key][index])
        assert index[:prefix].tolist() == list(range(prefix))  # the initial cache is kept whole
        image_frames = set(after["frames"][after["kinds"] == KIND["image"]].tolist())
        orphans = (after["kinds"][prefix:] == KIND["frame_text"]) & ~torch.isin(after["frames"][prefix:], torch.tensor(sorted(image_frames) or [-2]))
        assert not bool(orphans.any())  # frame text never outlives its frame's image tokens
    if name in TEXT_FIRST:
        dialogue_before = ((before["kinds"][prefix:] != KIND["image"]) & (before["kinds"][prefix:] != KIND["frame_text"])).sum()
        dialogue_after = ((after["kinds"][prefix:] != KIND["image"]) & (after["kinds"][prefix:] != KIND["frame_text"])).sum()
        frames_after = ((after["kinds"][prefix:] == KIND["image"]) | (after["kinds"][prefix:] == KIND["frame_text"])).sum()
        if dialogue_after < dialogue_before:
            assert frames_after == 0  # a dialogue token goes only once no evictable frame token is left


def test_stream_provenance_matches_what_was_fed(tiny_model, synthetic_conversations):
    fed = []
    runner = StreamRunner(tiny_model, create_strategy("full"), StreamSettings(max_new_tokens=6), on_forward=lambda *call: fed.append(call))
    conversation = synthetic_conversations[0]
    runner.run(conversation)
    ids = torch.tensor([token for call in fed for token in call[0]])
    cache = runner.cache
    assert len(ids) == cache_length(cache)
    assert torch.equal(cache.kinds == KIND["image"], ids == tiny_model.image_token_id)
    image_frames = cache.frames[cache.kinds == KIND["image"]]
    assert torch.equal(torch.bincount(image_frames)[torch.unique(image_frames)], torch.full((len(torch.unique(image_frames)),), tiny_model.image_tokens))
    assert (cache.patches[cache.kinds == KIND["image"]].reshape(-1, tiny_model.image_tokens) == torch.arange(tiny_model.image_tokens)).all()
    assert set(torch.unique(cache.frames[cache.kinds == KIND["frame_text"]]).tolist()) == set(torch.unique(image_frames).tolist())
    assert (cache.frames[(cache.kinds != KIND["image"]) & (cache.kinds != KIND["frame_text"])] == -1).all()
    text = tiny_model.decode(ids[cache.kinds == KIND["knowledge"]].tolist())
    assert "Task knowledge:" in text and (cache.kinds == KIND["user"]).any() and (cache.kinds == KIND["assistant"]).any()
    assert int(cache.kinds[0]) == KIND["system"] and (cache.kinds >= 0).all()


@pytest.mark.parametrize("name", ["snapkv", "tar_van"])
def test_threshold_policy_same_tokens_on_both_paths(tiny_model, synthetic_conversations, name):
    """Under the threshold policy the probe is cropped when the model stays silent: the recorded queries
    and provenance must follow on both paths."""
    # the random tiny model's not-talk probabilities lie around 2.1e-5: this threshold makes it silent at some frames
    policy = {"talk_policy": "threshold", "talk_threshold": 2.1e-5}
    _, _, eager, eager_calls = stream_with_checks(tiny_model, name, synthetic_conversations[0], **policy)
    _, _, fast, fast_calls = stream_with_checks(tiny_model, name, synthetic_conversations[0], optimized=True, **policy)
    probed = [r for r in eager.trace if "not_talk_probability" in r]
    assert 0 < len(eager.replies) < len(probed)  # it spoke at some frames and stayed silent (probe cropped) at others
    assert len(eager_calls) == len(fast_calls) >= 1
    for (_, a), (_, b) in zip(eager_calls, fast_calls):
        for key in ("positions", "kinds", "frames", "patches"):
            assert torch.equal(a[key], b[key])
    assert eager.replies == fast.replies
    assert [r["events"] for r in eager.trace] == [r["events"] for r in fast.trace]


@pytest.mark.parametrize("mode", ["original", "contiguous", "cache_length"])
def test_position_modes(tiny_model, synthetic_conversations, mode):
    strategy, runner, result, calls = stream_with_checks(tiny_model, "snapkv", synthetic_conversations[0], position_mode=mode)
    _, after = calls[-1]
    if mode == "contiguous":
        assert (after["positions"] == torch.arange(after["length"])).all()  # in every layer and head
    elif mode == "cache_length":
        assert after["next"] == after["length"]  # new tokens continue at the cache length (positions may repeat)
    else:
        positions = after["positions"]  # [layers, kv_heads, length]
        assert bool((positions[..., 1:] > positions[..., :-1]).all()) and bool((positions[..., -1] >= after["length"]).all())


@pytest.mark.parametrize("optimized", [False, True], ids=["eager", "optimized"])
def test_custom_strategy_returning_a_plain_cache_keeps_provenance(tiny_model, synthetic_conversations, optimized):
    from seed_custom_strategy import KeepRecentHalf

    strategy = KeepRecentHalf(max_seq_len=400, reserved_seq_len=32)
    runner = StreamRunner(tiny_model, strategy, StreamSettings(max_new_tokens=5, optimized=optimized))
    result = runner.run(synthetic_conversations[0])
    assert sum("compress" in r["events"] for r in result.trace) >= 2
    cache = runner.cache
    cache.check()
    assert (cache.kinds >= 0).all()  # every kept token was found again by its key
    assert result.trace[-1]["cache_frame_tokens"] == int(((cache.kinds == KIND["image"]) | (cache.kinds == KIND["frame_text"])).sum())


def test_seed_api_runs_a_zoo_strategy(tiny_model, synthetic_conversations):
    from prospect.runners import VLMStreamRunner

    runner = VLMStreamRunner(
        model_name="tiny_random", device="cpu", torch_dtype="float32", max_new_tokens=5, context_strategy_type="snapkv",
        context_strategy_config={"last_keep_len": 64, "window": 8}, max_seq_len=384, reserved_seq_len=32, model=tiny_model,
    )
    assert runner.context_strategy.window == 8
    conversation = synthetic_conversations[0]
    frames = [conversation.image(f.index) for f in conversation.frames]
    turns = [{"role": t.role, "content": t.content, "time": f.time} for f in conversation.frames for t in f.turns_before]
    out = runner.run_inference_on_video({"video_id": "v", "frames": frames, "conversation": turns, "fps": conversation.fps})
    assert out["cache_compressions"] >= 1 and runner.cache_manager.get_cache_length() <= 384


# ---- configs, job keys, the zoo grid -------------------------------------------------------------------


def test_every_strategy_has_a_config_and_builds_from_it():
    from prospect.context_strategies import strategy_from_config
    from tests.conftest import compose

    for name in STRATEGIES:
        cfg = compose(f"strategy={name}")
        assert strategy_from_config(cfg.strategy).name == name
    assert compose("strategy=streaming_llm").strategy.position_mode == "contiguous"


def test_zoo_grid_composes_every_bounded_strategy_and_deduplicates_by_job_key():
    from omegaconf import OmegaConf

    from prospect.tracking.results import job_key
    from prospect.validation import _job_override_lists, compose_config

    jobs = _job_override_lists(["experiment=strategy_zoo"], multirun=True)
    swept = [name for name in STRATEGIES if name != "full"]
    assert len(jobs) == 3 * len(swept)
    keys = {}
    for overrides in jobs:
        cfg = compose_config(overrides)
        keys.setdefault(job_key(OmegaConf.to_container(cfg, resolve=True)), []).append(cfg.strategy.name)
    names = sorted(name for group in keys.values() for name in set(group))
    assert len(keys) == 3 * (len(swept) - 3) + 3  # none, drop_all and summarize_and_drop ignore last_keep_len: one job each
    assert names.count("snapkv") == 3 and names.count("none") == 1 and "full" not in names


def test_job_key_holds_only_used_parameters():
    from omegaconf import OmegaConf

    from prospect.tracking.results import job_key
    from tests.conftest import compose

    def key(*overrides):
        return job_key(OmegaConf.to_container(compose(*overrides), resolve=True))

    assert key("strategy=snapkv") != key("strategy=snapkv", "strategy.window=16")
    assert key("strategy=drop_frames") != key("strategy=drop_frames", "strategy.last_keep_len=256")
    assert key("strategy=drop_all") == key("strategy=drop_all", "strategy.last_keep_len=256")


def test_frame_share_metric_is_the_mean_share_after_each_frame():
    from prospect.tracking.results import stream_metrics

    trace = [{"wall_ms": 1.0, "events": ["frame"], "cache_after": 100, "cache_frame_tokens": 80, "cache_dialogue_tokens": 20},
             {"wall_ms": 1.0, "events": ["frame"], "cache_after": 50, "cache_frame_tokens": 10, "cache_dialogue_tokens": 40}]
    assert stream_metrics([trace], 0.0)["cache_frame_share"] == pytest.approx((0.8 + 0.2) / 2)


def append_frames(cache: PositionedCache, first_frame: int, count: int, seed: int) -> None:
    """Append `count` frames (frame text 3, image 4, frame text 1) to a constructed cache."""
    generator = torch.Generator().manual_seed(seed)
    size = FRAME_TEXT_HEAD + IMAGE + FRAME_TEXT_TAIL
    kinds = ([KIND["frame_text"]] * FRAME_TEXT_HEAD + [KIND["image"]] * IMAGE + [KIND["frame_text"]] * FRAME_TEXT_TAIL) * count
    frames = [first_frame + f for f in range(count) for _ in range(size)]
    patches = ([-1] * FRAME_TEXT_HEAD + list(range(IMAGE)) + [-1] * FRAME_TEXT_TAIL) * count
    cache.take_positions(len(kinds), Provenance(torch.tensor(kinds, dtype=torch.int8), torch.tensor(frames), torch.tensor(patches)))
    for index, (keys, _) in enumerate(list(cache.layer_tensors())):
        shape = (1, keys.shape[1], len(kinds), keys.shape[3])
        cache.update(torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator), index)


def test_frame_coverage_keeps_sampling_the_whole_past_over_many_reductions():
    cache = constructed_cache(frames=8)
    cache.capacity = 10_000
    for layer in cache.layers:
        layer.capacity = 10_000
        layer.key_buffer = torch.cat([layer.key_buffer, torch.zeros(1, 2, 10_000 - layer.key_buffer.shape[2], 8)], dim=2)
        layer.value_buffer = torch.cat([layer.value_buffer, torch.zeros(1, 2, 10_000 - layer.value_buffer.shape[2], 8)], dim=2)
        layer.query_buffer = None
    strategy = strategy_on("frame_coverage", cache, last_keep_len=6 * 8 + 8)  # 4 dialogue tokens + 6 frames, then 1 more
    next_frame = 18
    for reduction in range(12):
        strategy.handle_overflow(cache, None)
        append_frames(cache, next_frame, 40, seed=reduction)
        next_frame += 40
    strategy.handle_overflow(cache, None)
    kept = sorted(set(cache.frames[cache.kinds == KIND["image"]].tolist()))
    assert kept[0] == 10 and kept[-1] == next_frame - 1  # the first and the newest frame
    gaps = [b - a for a, b in zip(kept, kept[1:])]
    assert max(gaps) <= 2 * (kept[-1] - kept[0]) / (len(kept) - 1)  # spread in time, not crowded at the end


def test_tar_van_protects_at_most_the_frames_there_are():
    cache = constructed_cache(frames=3)  # frames 10, 11, 12; 4 dialogue tokens
    kinds, frames = cache.kinds.tolist(), cache.frames.tolist()
    budget = 4 + 2 * 8  # the dialogue and two whole frames
    kept = kept_slots(strategy_on("tar_van", cache, last_keep_len=budget, protect_frames=4), cache)
    expected = [s for s in range(len(kinds)) if s < 6 or kinds[s] not in (KIND["frame_text"], KIND["image"]) or frames[s] in (11, 12)]
    assert kept == expected


@pytest.mark.slow
def test_zoo_multirun_writes_a_row_per_distinct_job(tmp_path, model_cache_dir):
    """`python -m prospect.run -m experiment=strategy_zoo` on a short synthetic video, tiny model."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    command = [sys.executable, "-m", "prospect.run", "-m", "experiment=strategy_zoo", "model=tiny_random", "model.device=cpu",
               "logger=none", "eval=none", "dataset.generate.seconds=40", "strategy.max_seq_len=2048", "stream.max_new_tokens=4",
               f"hydra.sweep.dir={tmp_path / 'zoo'}", f"cache_root={tmp_path}"]
    env = {**os.environ, "PROSPECT_CACHE_DIR": str(model_cache_dir), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    from prospect.context_strategies import STRATEGIES, strategy_parameters, zoo_strategies

    names = zoo_strategies()
    budgeted = [n for n in names if "last_keep_len" in (strategy_parameters(STRATEGIES[n]) or {"last_keep_len"})]
    jobs, distinct = 3 * len(names), 3 * len(budgeted) + (len(names) - len(budgeted))  # 3 last_keep_len values
    assert {"snapkv", "simple_stream", "streammem"} <= set(budgeted) and "none" in set(names) - set(budgeted)
    runs = [json.loads(p.read_text()) for p in (tmp_path / "zoo").glob("*/results.json")]
    assert len(runs) == jobs and all(r["status"] == "ok" for r in runs)
    assert len({r["job_key"] for r in runs}) == distinct
    summary, differences = (tmp_path / "zoo" / "summary.md").read_text().split("## Paired differences against the baseline")
    assert summary.count("| ok |") == distinct
    for name in set(budgeted) - {"drop_middle"}:
        assert summary.count(f"| {name} |") == 3, name  # one row per last_keep_len in each table
        assert differences.count(f"| {name} |") == 3, name
    again = subprocess.run(command[:-2] + [f"hydra.sweep.dir={tmp_path / 'again'}", f"cache_root={tmp_path}"], cwd=REPO,
                           capture_output=True, text=True, timeout=1200, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = [json.loads(p.read_text()) for p in (tmp_path / "again").glob("*/results.json")]
    assert len(rerun) == jobs and all(r.get("cached") for r in rerun)  # the same command again computes nothing
