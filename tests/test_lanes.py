"""Lanes: jobs that differ only in their strategy stream one conversation together (docs/sweeps.md, "Fused sweeps").

Each lane must give exactly what its job gives alone on the optimized path: bitwise replies and trace
(timings aside) on CPU in fp32, for every strategy, under both talk policies, with lanes of different
strategies and capacities side by side."""

from __future__ import annotations

import pytest
import torch

from prospect.cache import KIND, cache_length
from prospect.context_strategies import STRATEGIES, create_strategy
from prospect.models.static_forward import StaticForward
from prospect.stream.lanes import LaneRunner
from prospect.stream.frame_record import TIMING_FIELDS
from prospect.stream.runner import StreamRunner
from prospect.stream.settings import StreamSettings

SMALL = dict(max_seq_len=384, reserved_seq_len=32, last_keep_len=64, summary_max_new_tokens=24)
TIMING = set(TIMING_FIELDS)
# the random tiny model's not-talk probabilities lie around 2.1e-5: this threshold makes it silent at some frames
POLICIES = {"gt_turns": {}, "threshold": {"talk_policy": "threshold", "talk_threshold": 2.1e-5}}


def lane_strategies():
    """Every built-in strategy, small enough to reduce several times; drop_middle twice (another budget and
    capacity), so lanes of one step hold different lengths and capacities."""
    strategies = [create_strategy(name, **SMALL) for name in STRATEGIES]
    strategies.append(create_strategy("drop_middle", **{**SMALL, "max_seq_len": 448, "last_keep_len": 128}))
    return strategies


def comparable(trace):
    return [{k: v for k, v in record.items() if k not in TIMING} for record in trace]


def assert_each_lane_equals_its_job_alone(model, lanes: LaneRunner, settings: StreamSettings, conversation) -> list:
    """Run `conversation` in `lanes`, then each lane's strategy alone (StreamRunner, same settings): bitwise the
    same replies, trace (timings aside; summaries included), cache records and keys/values. Returns the lanes' results."""
    together = lanes.run(conversation)
    for strategy_lane, result in zip(lanes.lanes, together):
        alone = StreamRunner(model, create_strategy(strategy_lane.strategy.name, **_params(strategy_lane.strategy)), settings)
        expected = alone.run(conversation)
        name = strategy_lane.strategy.name
        assert result.error is None, name
        assert result.replies == expected.replies, name
        assert comparable(result.trace) == comparable(expected.trace), name
        # the lane's cache holds exactly the job's tokens: keys, values, positions and provenance
        mine, theirs = strategy_lane.cache, alone.cache
        for name_, a, b in zip(mine.records._fields, mine.records, theirs.records):  # [n] or per (layer, head)
            assert torch.equal(a, b), (name, name_)
        for (k1, v1), (k2, v2) in zip(mine.layer_tensors(), theirs.layer_tensors()):
            assert torch.equal(k1, k2) and torch.equal(v1, v2), name
    return together


@pytest.mark.parametrize("policy", ["gt_turns", pytest.param("gt_turns_every_conversation", marks=pytest.mark.slow),
                                    pytest.param("threshold", marks=pytest.mark.slow)])  # CI's slow pass
def test_every_lane_equals_its_job_run_alone(tiny_model, synthetic_conversations, policy):
    """By default on one conversation; the slow pass streams all four."""
    every = policy == "gt_turns_every_conversation"
    policy = "gt_turns" if every else policy
    settings = StreamSettings(max_new_tokens=8, optimized=True, **POLICIES[policy])
    lanes = LaneRunner(tiny_model, lane_strategies(), settings)
    assert len(lanes.lanes) >= 3
    steps = []
    original = lanes.static.forward_lanes
    lanes.static.forward_lanes = lambda caches, *args, **kwargs: steps.append(len(caches)) or original(caches, *args, **kwargs)
    conversations = synthetic_conversations if every else synthetic_conversations[:1]
    for conversation in conversations:
        together = assert_each_lane_equals_its_job_alone(tiny_model, lanes, settings, conversation)
    assert max(steps) == len(lanes.lanes) and min(steps) == 1  # frames went as one step of all lanes; restarts alone
    events = {event for lane, result in zip(lanes.lanes, together) for r in result.trace for event in r["events"]}
    assert {"compress", "summary", "speak"} <= events  # reductions and a summary restart happened inside lanes
    if policy == "threshold":
        probed = [r for r in together[0].trace if "not_talk_probability" in r]
        assert 0 < len(together[0].replies) < len(probed)  # some lanes spoke at some frames and not at others


def _params(strategy):
    import dataclasses

    return {f.name: getattr(strategy, f.name) for f in dataclasses.fields(strategy) if f.init}


def test_a_failing_lane_is_recorded_and_the_others_go_on(tiny_model, synthetic_conversations):
    class Broken(type(create_strategy("drop_middle"))):
        def handle_overflow(self, past_key_values, last_msg, **context):
            raise RuntimeError("broken strategy")

    settings = StreamSettings(max_new_tokens=8, optimized=True)
    strategies = [create_strategy("drop_middle", **SMALL), Broken(**{k: SMALL[k] for k in ("max_seq_len", "reserved_seq_len", "last_keep_len")}),
                  create_strategy("key_norm", **SMALL)]
    conversation = synthetic_conversations[0]
    together = LaneRunner(tiny_model, strategies, settings).run(conversation)
    assert together[1].error == "RuntimeError: broken strategy"
    assert 0 < len(together[1].trace) < len(together[0].trace)  # it stopped at its first reduction
    for index in (0, 2):
        alone = StreamRunner(tiny_model, create_strategy(strategies[index].name, **SMALL), settings).run(conversation)
        assert together[index].error is None
        assert together[index].replies == alone.replies
        assert comparable(together[index].trace) == comparable(alone.trace)


def test_batched_lanes_match_lanes_one_at_a_time(tiny_model, synthetic_conversations):
    """The batched step (what CUDA graphs replay) on CPU: the same tokens kept and replies, logits within fp32
    rounding of the lane-by-lane step."""
    settings = StreamSettings(max_new_tokens=8, optimized=True)
    conversation = synthetic_conversations[0]
    names = ["drop_middle", "snapkv", "summarize_and_drop", "summarize_and_drop"]  # two adjacent lanes summarize together

    def strategies():
        made = [create_strategy(n, **SMALL) for n in names]
        made[-1].summary_prompt = "Summarize what the user has done so far."
        return made

    one_by_one = LaneRunner(tiny_model, strategies(), settings, batch_lanes=False)
    batched = LaneRunner(tiny_model, strategies(), settings, batch_lanes=True)
    spans = []
    original = batched.static._run_chain
    batched.static._run_chain = lambda state, length, span: spans.append(span) or original(state, length, span)
    a, b = one_by_one.run(conversation), batched.run(conversation)
    for x, y, name in zip(a, b, names):
        assert x.replies == y.replies, name
        assert [r["events"] for r in x.trace] == [r["events"] for r in y.trace], name
        assert [r.get("summary") for r in x.trace] == [r.get("summary") for r in y.trace], name
    assert (2, 4) in spans  # the two summaries decoded on those two lanes' rows only
    for lane_a, lane_b in zip(one_by_one.lanes, batched.lanes):
        assert all(torch.equal(a, b) for a, b in zip(lane_a.cache.records, lane_b.cache.records))
        for (k1, _), (k2, _) in zip(lane_a.cache.layer_tensors(), lane_b.cache.layer_tensors()):
            torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)


def test_inactive_lanes_are_untouched_by_a_step(tiny_model):
    """A batched step of some lanes writes nothing into the others (their writes go to a scratch slot past
    every capacity), and a step of one lane alone touches only that lane."""
    static = StaticForward(tiny_model, [64, 80, 48], batch_lanes=True)
    caches = static.caches()
    static.forward_lanes(caches, [[300, 301, 302]] * 3)
    before = [[(k.clone(), v.clone()) for k, v in cache.layer_tensors()] for cache in caches]
    static.forward_lanes([caches[0], caches[2]], [[400, 401], [402, 403]])  # lane 1 inactive in an all-lane step
    assert cache_length(caches[1]) == 3
    for (k, v), (k0, v0) in zip(caches[1].layer_tensors(), before[1]):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    assert [cache_length(caches[lane]) for lane in (0, 2)] == [5, 5]
    before = [[(k.clone(), v.clone()) for k, v in cache.layer_tensors()] for cache in caches]
    static.forward_lanes([caches[1]], [[400, 401]])
    for lane in (0, 2):
        assert cache_length(caches[lane]) == 5
        for (k, v), (k0, v0) in zip(caches[lane].layer_tensors(), before[lane]):
            assert torch.equal(k, k0) and torch.equal(v, v0)
    assert cache_length(caches[1]) == 5 and caches[1].positions.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="KV buffer full: 5 \\+ 44 tokens > capacity 48"):
        static.forward_lanes([caches[2]], [[5] * 44])
    with pytest.raises(ValueError, match="chunks of one length"):
        static.forward_lanes(caches[:2], [[1], [1, 2]])


def test_a_step_of_adjacent_lanes_runs_on_their_rows_only(tiny_model):
    """Lanes 1 and 2 of 3, fed in either order, step on their own rows (`_span`): lane 0 is untouched, and the
    logits and caches are those of the same steps computed lane by lane (within fp32 rounding)."""
    outcomes = []
    for batch_lanes in (True, False):
        static = StaticForward(tiny_model, [64, 80, 48], batch_lanes=batch_lanes)
        caches = static.caches()
        static.forward_lanes(caches, [[300, 301, 302]] * 3)
        before = [(k.clone(), v.clone()) for k, v in caches[0].layer_tensors()]
        if batch_lanes:
            assert static._span([2, 1]) == (1, 3) and static._span([0, 2]) is None and static._span([0, 1, 2]) is None
            assert static._rows((1, 3)) == (slice(1, 3), 96)  # slots for the larger capacity (80) and a scratch slot
        logits = static.forward_lanes([caches[2], caches[1]], [[410, 411], [400, 401]])
        assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(caches[0].layer_tensors(), before))
        assert [cache_length(cache) for cache in caches] == [3, 5, 5]
        outcomes.append((logits, [[k.clone() for k, _ in cache.layer_tensors()] for cache in caches[1:]]))
    (batched, batched_keys), (alone, alone_keys) = outcomes
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(batched_keys, alone_keys):
        for k, k0 in zip(mine, theirs):
            torch.testing.assert_close(k, k0, rtol=1e-5, atol=1e-5)


def test_only_a_few_multi_lane_spans_get_rows_of_their_own(tiny_model):
    """Each span of several lanes gets graphs of its own, so at most MAX_SPANS of them do (speakers under the
    threshold policy vary from frame to frame); further ones run over all rows, one lane alone always on its own."""
    from prospect.models.static_forward import MAX_SPANS

    static = StaticForward(tiny_model, [48] * 12, batch_lanes=True)
    spans = [(start, start + 2) for start in range(11)]
    given = [static._span(list(range(a, b))) for a, b in spans]
    assert given[:MAX_SPANS] == spans[:MAX_SPANS] and given[MAX_SPANS:] == [None] * (len(spans) - MAX_SPANS)
    assert static._span([0, 1]) == (0, 2) and static._span([11]) == (11, 12) and static._span([3, 5]) is None


@pytest.mark.parametrize("batch_lanes", [False, True])
def test_the_device_decode_chooses_the_host_loops_tokens(tiny_model, synthetic_conversations, batch_lanes):
    """Greedy replies chosen on the device (StaticForward.decode_on_device, in chains of 3 steps) are the host
    loop's: same replies, trace and caches, with a stop id ending replies mid-chain and min_new_tokens holding
    it off at first, lanes of different capacities side by side; lane by lane and batched (what the CUDA
    graphs replay). A lane with an on_forward hook takes the host loop (it sees every step)."""
    conversation = synthetic_conversations[0]
    settings = StreamSettings(max_new_tokens=8, min_new_tokens=2, optimized=True)
    strategies = [create_strategy(name, **SMALL) for name in ("none", "drop_middle", "summarize_and_drop")]
    strategies.append(create_strategy("drop_middle", **{**SMALL, "max_seq_len": 448, "last_keep_len": 128}))

    def run(on_device: bool) -> tuple[list, list]:
        lanes = LaneRunner(tiny_model, [create_strategy(s.name, **_params(s)) for s in strategies], settings, batch_lanes=batch_lanes)
        lanes.static.chain = 3
        chosen = []
        original = lanes.static.decode_on_device
        lanes.static.decode_on_device = lambda *args, **kwargs: chosen.append(original(*args, **kwargs)) or chosen[-1]
        if not on_device:
            for lane in lanes.lanes:
                lane.on_forward = lambda *args: None
        results = lanes.run(conversation)
        assert all(r.error is None for r in results)
        assert bool(chosen) == on_device
        state = [(r.replies, comparable(r.trace), tuple(lane.cache.records), [(k.clone(), v.clone()) for k, v in lane.cache.layer_tensors()])
                 for r, lane in zip(results, lanes.lanes)]
        return state, [reply for call in chosen for reply, _ in call]

    def most_frequent(replies: list[list[int]], steps: slice) -> int:
        counts: dict[int, int] = {}
        for reply in replies:
            for token in reply[steps]:
                counts[token] = counts.get(token, 0) + 1
        return max(counts, key=counts.get)

    stop_ids = list(tiny_model.stop_ids)
    try:
        _, replies = run(on_device=True)
        early = most_frequent(replies, slice(0, 2))  # a stop id the lanes would choose at once: min_new_tokens holds it off
        tiny_model.stop_ids = stop_ids + [early]
        _, replies = run(on_device=True)
        late = most_frequent(replies, slice(2, None))  # and one they choose later: it ends replies mid-chain
        tiny_model.stop_ids = stop_ids + [early, late]
        on_device, replies = run(on_device=True)
        on_host, _ = run(on_device=False)
    finally:
        tiny_model.stop_ids = stop_ids
    assert any(2 <= len(reply) < settings.max_new_tokens - 1 for reply in replies)  # stopped mid-reply, past min_new_tokens
    for mine, theirs in zip(on_device, on_host):
        assert mine[:2] == theirs[:2]  # replies and trace
        assert all(torch.equal(a, b) for a, b in zip(mine[2], theirs[2]))  # positions and provenance
        assert all(torch.equal(k1, k2) and torch.equal(v1, v2) for (k1, v1), (k2, v2) in zip(mine[3], theirs[3]))


@pytest.mark.parametrize("batch_lanes", [False, True])
def test_a_lane_decoding_alone_stops_within_its_own_rows(tiny_model, batch_lanes):
    """A lane of the smaller capacity decodes alone and stops at its first token: the chain's remaining steps
    write to a scratch slot inside that lane's own rows (not past them), nothing reaches either cache."""
    static = StaticForward(tiny_model, [48, 200], batch_lanes=batch_lanes)
    caches = static.caches()
    prompt = static.forward_lanes(caches, [[300, 301, 302]] * 2)
    before = [[(k.clone(), v.clone()) for k, v in cache.layer_tensors()] for cache in caches]
    stop = tiny_model.stop_ids[0]
    logits = torch.full_like(prompt[0], -1.0)
    logits[stop] = 1.0  # the first pick is the stop id
    no_bias = torch.zeros_like(logits)
    assert static.decode_on_device([caches[0]], [logits], [(no_bias, no_bias)], 0, 8, 5) == [([], True)]
    for cache, kv in zip(caches, before):
        assert cache_length(cache) == 3
        assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(cache.layer_tensors(), kv))
    # the lane goes on as if alone: a reply that runs to max_new_tokens feeds all but its last token
    logits = prompt[0].clone()
    (reply, stopped), = static.decode_on_device([caches[0]], [logits], [(no_bias, no_bias)], 0, 4, 5)
    assert (not stopped and len(reply) == 4) or (stopped and len(reply) < 4)
    assert cache_length(caches[0]) == 3 + (len(reply) if stopped else len(reply) - 1)
    assert caches[0].kinds.tolist()[3:] == [5] * (cache_length(caches[0]) - 3)


def test_summaries_falling_together_decode_as_one_batch(tiny_model, synthetic_conversations):
    """Two summarize_and_drop lanes (one asking another prompt, of another length) reduce at the same frames:
    their summaries are decoded as one batch (one decode of both lanes), and each lane still equals its job
    alone, summaries included."""
    settings = StreamSettings(max_new_tokens=8, optimized=True)
    strategies = [create_strategy("summarize_and_drop", **SMALL),
                  create_strategy("summarize_and_drop", **SMALL, summary_prompt="Summarize what the user has done so far."),
                  create_strategy("drop_middle", **SMALL)]
    lanes = LaneRunner(tiny_model, strategies, settings)
    decodes = []
    original = lanes.static.decode_on_device
    lanes.static.decode_on_device = lambda caches, *args: decodes.append((len(caches), args[4])) or original(caches, *args)  # args[4]: kind
    together = assert_each_lane_equals_its_job_alone(tiny_model, lanes, settings, synthetic_conversations[0])
    texts = [[record["summary"] for record in result.trace if "summary" in record] for result in together]
    summaries = [len(text) for text in texts]
    assert summaries[0] == summaries[1] >= 1 and summaries[2] == 0
    assert texts[0] != texts[1]  # two prompts, two summaries
    decoded = [sum("summary_tokens" in record for record in result.trace) for result in together[:2]]
    assert decoded[0] == decoded[1] >= 1  # (a reduction without room for a summary decodes none)
    summary_decodes = [n for n, kind in decodes if kind == KIND["summary"]]
    assert summary_decodes == [2] * decoded[0]  # every reduction's two summaries in one decode


@pytest.mark.parametrize("batch_lanes", [False, True])
def test_a_decode_bounds_each_lane_by_its_own_limit(tiny_model, batch_lanes):
    """decode_on_device with one max_new_tokens per lane: each lane's reply and cache are those of a decode of that
    lane alone with its own bound (summaries are bounded by each lane's room)."""
    def decode(limits: list[int], lanes: list[int]):
        static = StaticForward(tiny_model, [64, 80], batch_lanes=batch_lanes)
        caches = static.caches()
        prompt = static.forward_lanes(caches, [[300, 301, 302]] * 2)
        no_bias = torch.zeros_like(prompt[0])
        replies = static.decode_on_device([caches[lane] for lane in lanes], [prompt[lane] for lane in lanes],
                                       [(no_bias, no_bias)] * len(lanes), 0, limits, 5)
        return replies, [(cache_length(caches[lane]), [k.clone() for k, _ in caches[lane].layer_tensors()]) for lane in lanes]

    tiny_model_stop_ids = list(tiny_model.stop_ids)
    tiny_model.stop_ids = [-5]  # no stop id: every reply runs to its bound
    try:
        both, both_caches = decode([2, 6], [0, 1])
        first, first_cache = decode([2], [0])
        second, second_cache = decode([6], [1])
    finally:
        tiny_model.stop_ids = tiny_model_stop_ids
    assert [len(reply) for reply, _ in both] == [2, 6]
    assert both == first + second
    for (length, keys), (length_alone, keys_alone) in zip(both_caches, first_cache + second_cache):
        assert length == length_alone
        assert all(torch.allclose(k, k0, atol=1e-5) for k, k0 in zip(keys, keys_alone))
    static = StaticForward(tiny_model, [64])
    cache, = static.caches()
    logits = torch.zeros(tiny_model.model.lm_head.out_features)
    with pytest.raises(ValueError, match="2 max_new_tokens for 1 lanes"):
        static.decode_on_device([cache], [logits], [(logits, logits)], 0, [1, 2], 5)


@pytest.mark.slow  # CI's slow pass; by default tests/test_stream.py checks seeded sampling on both paths
def test_sampled_lanes_equal_their_jobs_and_the_host_loop(tiny_model, synthetic_conversations):
    """temperature > 0: the tokens are drawn on the device (decode_on_device, chains of 3 steps) from each lane's
    generator, seeded per decode; each lane equals its job alone, bitwise, and the host loop (a lane with an
    on_forward hook takes it) draws the same replies; another seed draws others."""
    conversation = synthetic_conversations[0]

    def run(seed: int, on_device: bool) -> list:
        settings = StreamSettings(max_new_tokens=8, optimized=True, temperature=1.0, top_p=0.9, seed=seed)
        strategies = [create_strategy(name, **SMALL) for name in ("drop_middle", "summarize_and_drop", "snapkv")]
        lanes = LaneRunner(tiny_model, strategies, settings)
        lanes.static.chain = 3
        calls = []
        original = lanes.static.decode_on_device
        lanes.static.decode_on_device = lambda *args: calls.append(args[-1]) or original(*args)
        if on_device:
            results = assert_each_lane_equals_its_job_alone(tiny_model, lanes, settings, conversation)
        else:
            for lane in lanes.lanes:
                lane.on_forward = lambda *args: None
            results = lanes.run(conversation)
        assert bool(calls) == on_device and all(sampling is not None for sampling in calls)
        return [(result.replies, [r.get("summary") for r in result.trace]) for result in results]

    on_device = run(3, on_device=True)
    assert on_device == run(3, on_device=False)
    assert on_device != run(4, on_device=True)
    greedy = LaneRunner(tiny_model, [create_strategy("drop_middle", **SMALL)], StreamSettings(max_new_tokens=8, optimized=True)).run(conversation)
    assert on_device[0][0] != greedy[0].replies


def _shorter(conversation, frames: int, suffix: str):
    import dataclasses

    return dataclasses.replace(conversation, id=f"{conversation.id}{suffix}", frames=conversation.frames[:frames])


@pytest.mark.parametrize("policy", ["gt_turns", pytest.param("threshold", marks=pytest.mark.slow)])
def test_conversations_as_lanes_equal_each_conversation_alone(tiny_model, synthetic_conversations, policy):
    """Lanes streaming different conversations of different lengths (strategies x conversations, as
    stream.conversation_batch makes them): each lane's replies, trace, cache contents equal its conversation
    streamed alone under its strategy, bitwise; a lane whose conversation ended sits the later steps out."""
    settings = StreamSettings(max_new_tokens=8, optimized=True, **POLICIES[policy])
    first, second = synthetic_conversations[0], synthetic_conversations[-1]
    conversations = [first, _shorter(second, 23, "-short"), _shorter(first, 41, "-mid")]
    names = ["drop_middle", "summarize_and_drop", "snapkv"]
    strategies = [create_strategy(name, **SMALL) for name in names for _ in conversations]
    per_lane = [c for _ in names for c in conversations]
    lanes = LaneRunner(tiny_model, strategies, settings)
    steps = []
    original = lanes.static.forward_lanes
    lanes.static.forward_lanes = lambda caches, *args, **kwargs: steps.append(len(caches)) or original(caches, *args, **kwargs)
    together = lanes.run(per_lane)
    assert max(steps) > len(names)  # lanes of several conversations went through the model as one step
    for lane, conversation, result in zip(lanes.lanes, per_lane, together):
        alone_runner = StreamRunner(tiny_model, create_strategy(lane.strategy.name, **SMALL), settings)
        alone = alone_runner.run(conversation)
        label = (lane.strategy.name, conversation.id)
        assert result.error is None, label
        assert result.conversation is conversation
        assert len(result.trace) == len(alone.trace) == conversation.num_frames, label
        assert result.replies == alone.replies, label
        assert comparable(result.trace) == comparable(alone.trace), label
        assert all(torch.equal(a, b) for a, b in zip(lane.cache.records, alone_runner.cache.records)), label
        for (k1, v1), (k2, v2) in zip(lane.cache.layer_tensors(), alone_runner.cache.layer_tensors()):
            assert torch.equal(k1, k2) and torch.equal(v1, v2), label
    events = {event for result in together for r in result.trace for event in r["events"]}
    assert {"compress", "summary", "speak"} <= events


def test_conversations_as_batched_lanes_match_them_one_at_a_time(tiny_model, synthetic_conversations):
    """The batched step over lanes of different conversations (per-lane images and chunks of several lengths,
    what CUDA graphs replay) on CPU: the same replies and events as lane by lane, keys within fp32 rounding."""
    settings = StreamSettings(max_new_tokens=8, optimized=True)
    first, second = synthetic_conversations[0], synthetic_conversations[-1]
    conversations = [first, _shorter(second, 30, "-short")]
    names = ["drop_middle", "drop_middle"]

    def runner(batch: bool) -> LaneRunner:
        return LaneRunner(tiny_model, [create_strategy(n, **SMALL) for n in names], settings, batch_lanes=batch)

    one_by_one, batched = runner(False), runner(True)
    images = []
    original = batched.static.forward_lanes
    batched.static.forward_lanes = lambda caches, ids, image=None, *a, **k: images.append(isinstance(image, list)) or original(caches, ids, image, *a, **k)
    a, b = one_by_one.run(conversations), batched.run(conversations)
    assert any(images)  # frames of two conversations in one step, each lane with its own image
    for x, y in zip(a, b):
        assert x.replies == y.replies and len(x.trace) == len(y.trace)
        assert [r["events"] for r in x.trace] == [r["events"] for r in y.trace]
    for lane_a, lane_b in zip(one_by_one.lanes, batched.lanes):
        assert all(torch.equal(p, q) for p, q in zip(lane_a.cache.records, lane_b.cache.records))
        for (k1, _), (k2, _) in zip(lane_a.cache.layer_tensors(), lane_b.cache.layer_tensors()):
            torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)


def test_the_step_embeds_each_lanes_frame_itself(tiny_model, monkeypatch):
    """A frame step takes ids and image features and embeds them inside the step (captured in the CUDA graph on
    a GPU), without the model's host-side embed: lanes whose chunks differ (two frames, one frame at another
    offset, text only) get the eager forward's logits of their own chunk, also when the step (and its feature
    buffer, holding the first call's rows) runs again; features that do not fit a chunk's <image> tokens
    raise before any cache changes."""
    k, image = tiny_model.image_tokens, tiny_model.image_token_id
    hidden = tiny_model.model.config.text_config.hidden_size
    capacity = 6 * k + 32
    static = StaticForward(tiny_model, [capacity] * 3, batch_lanes=True)
    caches = static.caches()
    prefixes = [[300, 301], [302, 303], [304, 305]]
    static.forward_lanes(caches, prefixes)
    chunks = [[310] + [image] * (2 * k) + [311, 312], [313, 314] + [image] * k + [315] * (k + 1), list(range(320, 323 + 2 * k))]
    generator = torch.Generator().manual_seed(0)

    def draw():
        return [torch.randn(2, k, hidden, generator=generator).to(tiny_model.dtype),
                torch.randn(1, k, hidden, generator=generator).to(tiny_model.dtype), None]

    eager = [tiny_model.new_cache(capacity) for _ in chunks]
    for prefix, cache in zip(prefixes, eager):
        tiny_model.forward(prefix, cache)
    embed = tiny_model.embed
    for _ in range(2):  # the second call replays the first call's step
        features = draw()
        monkeypatch.setattr(tiny_model, "embed", lambda *a, **kw: pytest.fail("the frame step called the model's embed"))
        logits = static.forward_lanes(caches, chunks, features, all_logits=True)
        monkeypatch.setattr(tiny_model, "embed", embed)
        for lane, (chunk, rows, cache) in enumerate(zip(chunks, features, eager)):
            expected = tiny_model.forward(chunk, cache, rows, all_logits=True)
            torch.testing.assert_close(logits[lane], expected, rtol=1e-4, atol=1e-4)
    assert len(static.steps) == 2  # the prefix's step and one frame step, replayed
    assert not torch.allclose(logits[0], logits[1])
    before = [(cache_length(cache), cache.positions.clone()) for cache in caches]
    with pytest.raises(ValueError, match=f"^{k} <image> tokens but {k - 1} image feature rows$"):
        static.forward_lanes(caches, chunks, [features[0], features[1][:, :-1], None])
    with pytest.raises(ValueError, match=f"^0 <image> tokens but {k} image feature rows$"):
        static.forward_lanes(caches, chunks, [features[0], features[1], features[1]])
    with pytest.raises(ValueError, match=f"^{2 * k} <image> tokens but 0 image feature rows$"):
        static.forward_lanes(caches[:1], chunks[:1])
    assert all(length == cache_length(cache) and torch.equal(positions, cache.positions) for (length, positions), cache in zip(before, caches))
