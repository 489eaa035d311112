"""Measurements the stream makes without changing it: teacher-forced reference scores (ref_nll, ref_tokens,
ref_top1) and P(speak) per frame; their exact definitions, and that with them on a run is bitwise the run
with them off (replies, trace, cache contents), on every path, for every strategy, under both talk policies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prospect.cache import clone_cache
from prospect.context_strategies import STRATEGIES, ContextOverflowError, create_strategy
from prospect.eval.stream_scores import conversation_scores, pool, speak_auc
from prospect.stream.lanes import LaneRunner
from prospect.stream.frame_record import TURN_FIELDS
from prospect.stream.frame_record import TIMING_FIELDS, ConversationResult
from prospect.stream.runner import StreamRunner
from prospect.stream.settings import StreamSettings

SMALL = dict(max_seq_len=384, reserved_seq_len=32, last_keep_len=64, summary_max_new_tokens=24)
TIMING = set(TIMING_FIELDS)
MEASURED = {*TURN_FIELDS, "speak_probability"}
POLICIES = {"gt_turns": {}, "threshold": {"talk_policy": "threshold", "talk_threshold": 2.1e-5}}


def settings(on: bool, **extra) -> StreamSettings:
    return StreamSettings(**{"max_new_tokens": 8, **extra}, reference_scores=on, speak_probe=on)


def without_measurements(trace):
    return [{k: v for k, v in record.items() if k not in TIMING | MEASURED} for record in trace]


def cache_state(cache):
    return ([(k.clone(), v.clone()) for k, v in cache.layer_tensors()], cache.next_position, [t.clone() for t in cache.records])


def assert_same_cache(a, b, name):
    (kv_a, next_a, records_a), (kv_b, next_b, records_b) = a, b
    assert next_a == next_b, name
    assert all(torch.equal(x, y) for x, y in zip(records_a, records_b)), name  # positions and provenance
    assert len(kv_a) == len(kv_b)
    for (k1, v1), (k2, v2) in zip(kv_a, kv_b):
        assert torch.equal(k1, k2) and torch.equal(v1, v2), name


def assert_same_stream(on, off, name):
    assert on.error is None and off.error is None, name
    assert on.replies == off.replies, name
    assert [r.get("summary") for r in on.trace] == [r.get("summary") for r in off.trace], name
    assert without_measurements(on.trace) == without_measurements(off.trace), name


def assert_measured(result, conversation, policy):
    """The measurements are there: every reference scored, every fed frame probed (or decided by the threshold)."""
    scored = [r for r in result.trace if "ref_nll" in r]
    assert len(scored) == len(conversation.references) >= 4
    assert all(r["reference_due"] for r in scored)
    probed = [r for r in result.trace if "speak_probability" in r]
    assert len(probed) == len(result.trace)
    if policy == "threshold":
        assert all(math.isclose(r["speak_probability"], 1 - r["not_talk_probability"]) for r in probed)


# every strategy as lanes under the threshold policy: the slowest variants, in CI's slow pass (-m slow)
SLOW_THRESHOLD = ["gt_turns", pytest.param("threshold", marks=pytest.mark.slow)]

EAGER_DEFAULT = ("drop_middle", "summarize_and_drop", "streammem")  # a drop, a summary, a merge: the slow pass runs all


@pytest.mark.parametrize("policy, names", [("gt_turns", EAGER_DEFAULT), pytest.param("gt_turns", tuple(STRATEGIES), marks=pytest.mark.slow),
                                           pytest.param("threshold", tuple(STRATEGIES), marks=pytest.mark.slow)],
                         ids=["gt_turns", "gt_turns-every-strategy", "threshold"])
def test_measuring_changes_nothing_on_the_eager_path(tiny_model, synthetic_conversations, policy, names):
    conversation = synthetic_conversations[0]
    for name in names:
        runs = []
        for on in (True, False):
            runner = StreamRunner(tiny_model, create_strategy(name, **SMALL), settings(on, optimized=False, **POLICIES[policy]))
            runs.append((runner.run(conversation), cache_state(runner.cache)))
        (on, cache_on), (off, cache_off) = runs
        assert_same_stream(on, off, name)
        assert_same_cache(cache_on, cache_off, name)
        assert_measured(on, conversation, policy)
        left = MEASURED - ({"speak_probability"} if policy == "threshold" else set())  # the threshold policy probes anyway
        assert not any(left & set(r) for r in off.trace), name


@pytest.mark.parametrize("policy", SLOW_THRESHOLD)
def test_measuring_changes_nothing_in_lanes_and_scores_in_one_batched_step(tiny_model, synthetic_conversations, policy):
    """Every strategy as a lane (the optimized step): with the measurements on, replies, trace and caches are
    bitwise those with them off; the reference of all lanes is scored as one step, and P(speak) probed as one."""
    conversation = synthetic_conversations[0]
    strategies = lambda: [create_strategy(name, **SMALL) for name in STRATEGIES]  # noqa: E731
    on = LaneRunner(tiny_model, strategies(), settings(True, optimized=True, **POLICIES[policy]))
    steps = []
    original = on.static.forward_lanes

    def spy(caches, ids, image=None, all_logits=False, provenances=None, append=True):
        steps.append((len(caches), all_logits, append))
        return original(caches, ids, image, all_logits, provenances, append)

    on.static.forward_lanes = spy
    off = LaneRunner(tiny_model, strategies(), settings(False, optimized=True, **POLICIES[policy]))
    with_them, without = on.run(conversation), off.run(conversation)
    for lane_on, lane_off, a, b in zip(on.lanes, off.lanes, with_them, without):
        assert_same_stream(a, b, lane_on.strategy.name)
        assert_same_cache(cache_state(lane_on.cache), cache_state(lane_off.cache), lane_on.strategy.name)
        assert_measured(a, conversation, policy)
    lanes = len(on.lanes)
    assert (lanes, True, False) in steps  # a reference scored in every lane at once
    if policy == "gt_turns":
        assert (lanes, False, False) in steps  # P(speak) probed in every lane at once


@pytest.mark.parametrize("policy", SLOW_THRESHOLD)
def test_batched_lanes_measure_without_changing_anything_and_score_all_lanes_in_one_computation(tiny_model, synthetic_conversations, policy):
    """batch_lanes=True (CUDA's way, and hydra.launcher.batch_lanes=true on the CPU): one computation for all lanes.
    Measurements on or off, the lanes' replies, trace and caches are bitwise the same; a reference is scored for
    every lane by a single forward of the batch."""
    conversation = synthetic_conversations[1]
    names = ["drop_middle", "snapkv", "summarize_and_drop", "streaming_llm"]
    on = LaneRunner(tiny_model, [create_strategy(n, **SMALL) for n in names], settings(True, optimized=True, **POLICIES[policy]),
                    batch_lanes=True)
    off = LaneRunner(tiny_model, [create_strategy(n, **SMALL) for n in names], settings(False, optimized=True, **POLICIES[policy]),
                     batch_lanes=True)
    bodies = []
    original = on.static._body
    on.static._body = lambda step, all_logits, rows=None, width=None: bodies.append((all_logits, rows)) or original(step, all_logits, rows, width)
    with_them, without = on.run(conversation), off.run(conversation)
    for lane_on, lane_off, a, b in zip(on.lanes, off.lanes, with_them, without):
        assert_same_stream(a, b, lane_on.strategy.name)
        assert_same_cache(cache_state(lane_on.cache), cache_state(lane_off.cache), lane_on.strategy.name)
        assert_measured(a, conversation, policy)
    assert (True, None) in bodies  # every logit of every lane's reference in one forward of the whole batch


def test_the_three_paths_give_equal_scores(tiny_model, synthetic_conversations):
    """Eager, optimized and lanes: the lanes' scores are bitwise the optimized job's (tests/test_lanes.py compares
    whole traces); here eager against optimized, equal within fp32 rounding, and against a lane."""
    conversation = synthetic_conversations[1]
    traces = {}
    for path, optimized in (("eager", False), ("optimized", True)):
        traces[path] = StreamRunner(tiny_model, create_strategy("drop_middle", **SMALL), settings(True, optimized=optimized)).run(conversation).trace
    lanes = LaneRunner(tiny_model, [create_strategy("key_norm", **SMALL), create_strategy("drop_middle", **SMALL)], settings(True, optimized=True))
    traces["lane"] = lanes.run(conversation)[1].trace
    scored = [r["index"] for r in traces["eager"] if "ref_nll" in r]
    assert len(scored) >= 4
    for path in ("optimized", "lane"):
        assert [r["index"] for r in traces[path] if "ref_nll" in r] == scored
        for a, b in zip(traces["eager"], traces[path]):
            for key in ("ref_nll", "ref_top1", "speak_probability"):
                assert (key in a) == (key in b)
                if key in a:
                    assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-5), (path, key, a["index"])
            assert a.get("ref_tokens") == b.get("ref_tokens")
    for a, b in zip(traces["optimized"], traces["lane"]):
        assert {k: a[k] for k in MEASURED if k in a} == {k: b[k] for k in MEASURED if k in b}  # bitwise


def _hand_nll(model, kept, ids, first_position, targets_from):
    """Summed NLL of ids[targets_from:] given the kept keys/values and ids before them: a forward of transformers'
    own text model over a DynamicCache holding exactly the kept tokens, then cross entropy in fp32."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (keys, values) in enumerate(kept.layer_tensors()):
        cache.update(keys.clone(), values.clone(), layer)
    text = model.model.model.text_model
    embeds = model.model.get_input_embeddings()(torch.tensor([ids]))
    positions = torch.arange(first_position, first_position + len(ids))[None]
    with torch.no_grad():
        hidden = text(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
        logits = model.model.lm_head(hidden[0]).float()
    targets = torch.tensor(ids[targets_from:])
    per_token = torch.nn.functional.cross_entropy(logits[targets_from - 1 : -1], targets, reduction="none")
    return float(per_token.double().sum())


@pytest.mark.parametrize("optimized", [False, True])
def test_ref_nll_equals_a_fresh_forward_over_the_kept_cache(tiny_model, synthetic_conversations, optimized):
    """After drop_middle has reduced the cache, one turn's ref_nll equals a fresh forward (transformers' model,
    its own cache class) of exactly the kept cache tokens plus the reply prompt and the reference."""
    conversation = synthetic_conversations[0]
    runner = StreamRunner(tiny_model, create_strategy("drop_middle", **SMALL), settings(True, optimized=optimized))
    prompt = runner.prompt_ids
    snapshots = []

    def on_forward(ids, image, positions, logits):
        if list(ids) == prompt:  # the reply prompt was just fed: what the reference is scored on
            kept = clone_cache(runner.cache)
            snapshots.append((kept, int(positions[0])))

    runner.on_forward = on_forward
    result = runner.run(conversation)
    scored = [r for r in result.trace if "ref_nll" in r]
    reduced_before = [r for r in scored if any(x["events"] != ["frame"] and "compress" in x["events"]
                                                for x in result.trace if x["index"] < r["index"])]
    assert reduced_before, "no reference was scored after a reduction"
    assert len(snapshots) == len(scored)
    checked = 0
    for record, (kept, prompt_position) in zip(scored, snapshots):
        if record not in reduced_before:
            continue
        frame = next(f for f in conversation.frames if f.index == record["index"])
        target = tiny_model.encode(tiny_model.chat.reply_text(frame.reference))
        before_prompt = clone_cache(kept)
        from prospect.cache import crop_end

        crop_end(before_prompt, len(prompt))
        expected = _hand_nll(tiny_model, before_prompt, prompt + target, prompt_position, len(prompt))
        assert record["ref_tokens"] == len(target)
        assert abs(record["ref_nll"] - expected) <= 1e-5, (record["ref_nll"], expected)
        checked += 1
    assert checked >= 1


def test_speak_probe_is_the_threshold_policys_probability(tiny_model, synthetic_conversations):
    """Under gt_turns a frame without a reference is probed exactly as the threshold policy probes: until the first
    reference (where gt_turns speaks and the two streams part), P(speak) equals 1 - the threshold policy's
    not-talk probability at the same frame, bitwise (the threshold run never speaks: threshold 0)."""
    conversation = synthetic_conversations[0]
    probe = StreamRunner(tiny_model, create_strategy("full"), settings(True, optimized=False)).run(conversation).trace
    policy = StreamRunner(tiny_model, create_strategy("full"), settings(True, optimized=False, talk_policy="threshold",
                                                                           talk_threshold=0.0)).run(conversation).trace
    first = next(k for k, r in enumerate(probe) if r["reference_due"])
    assert first >= 3
    for a, b in zip(probe[: first + 1], policy[: first + 1]):
        assert a["speak_probability"] == 1.0 - b["not_talk_probability"] == b["speak_probability"]


def test_a_probe_without_room_is_skipped_not_made_room_for(tiny_model, synthetic_conversations):
    """A frame whose cache has no room for the probe's prompt gets no P(speak) (the probe never reduces)."""
    conversation = synthetic_conversations[0]
    trace = StreamRunner(tiny_model, create_strategy("full"), settings(True, optimized=False)).run(conversation).trace
    quiet = next(k for k, r in enumerate(trace) if k > 2 and not r["reference_due"])
    tight = StreamRunner(tiny_model, create_strategy("full"), settings(True, optimized=False))
    tight.capacity = trace[quiet]["cache_after"]  # that frame fills the cache: no room for the prompt
    result = ConversationResult(conversation)
    with pytest.raises(ContextOverflowError, match="cannot grow past"):  # the next frame does not fit, as without the probe
        tight.run(conversation, result)
    assert "speak_probability" not in result.trace[quiet]
    assert all("speak_probability" in r for r in result.trace[:quiet])
    assert [r["cache_after"] for r in result.trace] == [r["cache_after"] for r in trace[: quiet + 1]]


def test_a_reference_longer_than_the_room_left_is_scored_on_its_first_tokens(tiny_model, synthetic_conversations):
    """With replies of at most 1 token, a reduction before a reply leaves room for the prompt, one token and the
    closing only: a longer reference is scored on the tokens that fit (room + 1, the last not fed), marked truncated,
    and the stream is still that of the run without scores."""
    conversation = synthetic_conversations[0]
    tight = {**SMALL, "max_seq_len": 360, "reserved_seq_len": 0}  # reduce only when full: replies start with little room
    runs = [StreamRunner(tiny_model, create_strategy("drop_middle", **tight), settings(on, optimized=False, max_new_tokens=1))
            for on in (True, False)]
    (on, off) = (runner.run(conversation) for runner in runs)
    assert_same_stream(on, off, "drop_middle")
    truncated = [r for r in on.trace if r.get("ref_truncated")]
    assert truncated, "no reference was truncated"
    for record in [r for r in on.trace if "ref_nll" in r]:
        frame = next(f for f in conversation.frames if f.index == record["index"])
        target = tiny_model.encode(tiny_model.chat.reply_text(frame.reference))
        if record.get("ref_truncated"):
            assert 1 <= record["ref_tokens"] < len(target)
        else:
            assert record["ref_tokens"] == len(target)
    from prospect.eval.stream_scores import conversation_scores as scores
    from prospect.tracking.job_files import predictions_document

    entry = predictions_document([on])["conversations"][0]
    assert scores(entry)["ref_truncated_turns"] == len(truncated)


# ---- the definitions, by hand -------------------------------------------------------------------------


def test_speak_auc_hand_worked_and_constant_scores():
    # due 0.9, 0.2 against not due 0.1, 0.5, 0.3: pairs won 3 (0.9) + 1 (0.2 > 0.1) of 6
    assert speak_auc([0.9, 0.2], [0.1, 0.5, 0.3]) == pytest.approx(4 / 6)
    assert speak_auc([0.4, 0.4], [0.4, 0.4, 0.4]) == 0.5  # every pair tied: one half each
    assert speak_auc([0.7], [0.7, 0.2]) == pytest.approx(0.75)  # a tie counts one half
    assert speak_auc([], [0.1]) is None and speak_auc([0.1], []) is None


def test_reference_and_speak_scores_of_a_conversation_and_a_run_by_hand():
    first = {"frames": [{"index": 3, "ref_nll": 6.0, "ref_tokens": 3, "ref_top1": 1 / 3},
                        {"index": 9, "ref_nll": 2.0, "ref_tokens": 1, "ref_top1": 1.0},
                        {"index": 12, "gen": "x", "ref": ""}],
             "speak_probability": {"index": [0, 1, 2, 3], "p": [0.2, 0.9, 0.4, 0.8], "due": [False, True, False, True]}}
    second = {"frames": [{"index": 5, "ref_nll": 12.0, "ref_tokens": 4, "ref_top1": 0.5}],
              "speak_probability": {"index": [0, 1], "p": [0.3, 0.6], "due": [False, False]}}
    a, b = conversation_scores(first), conversation_scores(second)
    assert a["ref_turns"] == 2 and a["ref_tokens"] == 4
    assert a["ref_nll"] == pytest.approx(4.0) and a["ref_ppl"] == pytest.approx(math.exp(8.0 / 4))
    assert a["ref_top1"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert a["speak_auc"] == 1.0 and a["speak_prob_due"] == pytest.approx(0.85) and a["speak_prob_not_due"] == pytest.approx(0.3)
    assert "speak_auc" not in b and b["speak_frames_due"] == 0
    run = pool([a, b])
    assert run["ref_turns"] == 3 and run["ref_tokens"] == 8
    assert run["ref_ppl"] == pytest.approx(math.exp(20.0 / 8)) and run["ref_nll"] == pytest.approx(20.0 / 3)
    assert run["ref_top1"] == pytest.approx((1 / 3 + 1.0 + 0.5) / 3)
    assert run["speak_auc"] == 1.0 and run["speak_auc_conversations"] == 1 and run["ref_truncated_turns"] == 0
    assert run["speak_prob_not_due"] == pytest.approx((0.2 + 0.4 + 0.3 + 0.6) / 4)
    assert conversation_scores({"frames": [{"index": 1, "gen": "a", "ref": "b"}]}) == {}


def test_token_scores_are_cross_entropy_and_argmax():
    from prospect.stream.reference_scores import token_scores

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=generator)
    targets = [3, 0, int(logits[2].argmax()), 10, int(logits[4].argmax())]
    nll, hits = token_scores(logits, targets)
    assert nll == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor(targets), reduction="sum")), rel=1e-6)
    assert hits == sum(int(logits[i].argmax()) == t for i, t in enumerate(targets)) >= 2


def test_reply_text_is_what_follows_the_assistant_prompt():
    from prospect.models.chat_format import CHATML, SMOLVLM

    assert SMOLVLM.reply_text("Now the wheels.") == " Now the wheels."
    assert CHATML.reply_text("Now the wheels.") == "Now the wheels."
    for chat in (SMOLVLM, CHATML):
        turn = chat.text_turn("assistant", "Now the wheels.")
        assert turn == chat.assistant_prompt + chat.reply_text("Now the wheels.") + chat.turn_closing
