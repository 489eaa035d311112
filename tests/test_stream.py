"""The stream and the strategies with a real (tiny, random) SmolVLM2 in fp32: exactness against a single
forward pass, bitwise cache contents after each reduction, the max_seq_len invariant, talk policies."""

from __future__ import annotations

import pytest
import torch

from prospect.cache import cache_length, keep_spans, make_contiguous
from prospect.context_strategies import DropAll, DropMiddle, FullContext, NoContext, SummarizeAndDrop, create_strategy
from prospect.stream.runner import StreamRunner
from prospect.stream.settings import StreamSettings

SMALL = dict(max_seq_len=384, reserved_seq_len=32)


def run_stream(model, strategy, conversation, on_forward=None, **settings):
    settings = {"max_new_tokens": 6, **settings}
    runner = StreamRunner(model, strategy, StreamSettings(**settings), on_forward=on_forward)
    return runner, runner.run(conversation)


def test_full_stream_reproduces_a_single_forward_pass(tiny_model, synthetic_conversations):
    conversation = synthetic_conversations[0]
    fed = []
    _, result = run_stream(tiny_model, FullContext(), conversation, on_forward=lambda *call: fed.append(call))
    assert len(result.replies) == len(conversation.references) >= 4  # replies are part of the stream
    all_ids = [token for ids, _, _, _ in fed for token in ids]
    images = torch.cat([image.reshape(-1, image.shape[-1]) for _, image, _, _ in fed if image is not None])
    reference = tiny_model.forward(all_ids, tiny_model.new_cache(len(all_ids)), images, all_logits=True)
    offset, worst = 0, 0.0
    for ids, _, positions, logits in fed:
        assert positions.tolist() == list(range(offset, offset + len(ids)))
        offset += len(ids)
        worst = max(worst, float((logits - reference[offset - 1]).abs().max()))
    assert worst <= 1e-4, worst


class Recorded:
    """Wraps a strategy's handle_overflow to keep the cache before and after every reduction."""

    def __init__(self, strategy):
        self.strategy, self.calls = strategy, []
        original = strategy.handle_overflow

        def handle_overflow(cache, last_msg, **context):
            before = [(k.clone(), v.clone()) for k, v in cache.layer_tensors()]
            positions, length = cache.positions.clone(), cache_length(cache)
            cache, last_msg = original(cache, last_msg, **context)
            after = [(k.clone(), v.clone()) for k, v in cache.layer_tensors()]
            self.calls.append({"before": before, "positions": positions, "length": length, "after": after,
                               "next": cache.next_position, "last_msg": last_msg, "context": context})
            return cache, last_msg

        strategy.handle_overflow = handle_overflow


def test_drop_middle_keeps_initial_cache_and_last_tokens_bitwise(tiny_model, synthetic_conversations):
    strategy = DropMiddle(last_keep_len=64, **SMALL)
    recorded = Recorded(strategy)
    run_stream(tiny_model, strategy, synthetic_conversations[0])
    assert len(recorded.calls) >= 3
    init = strategy.init_len
    snapshot = list(strategy.init_kv_cache.layer_tensors())
    for call in recorded.calls:
        start = max(call["length"] - 64, init)
        for (k0, v0), (k1, v1), (ki, vi) in zip(call["before"], call["after"], snapshot):
            assert torch.equal(k1, torch.cat([k0[:, :, :init], k0[:, :, start:]], dim=2))
            assert torch.equal(v1, torch.cat([v0[:, :, :init], v0[:, :, start:]], dim=2))
            assert torch.equal(k0[:, :, :init].cpu(), ki) and torch.equal(v0[:, :, :init].cpu(), vi)  # the prefix is the initial cache
        assert call["next"] == call["positions"][-1] + 1  # original: the running counter continues


def test_drop_middle_before_initial_cache_drops_everything(tiny_model):
    strategy = DropMiddle(last_keep_len=8, max_seq_len=64, reserved_seq_len=4)
    cache = tiny_model.new_cache(64)
    tiny_model.forward(tiny_model.encode("hello there " * 10), cache)
    strategy.start_stream(prompt_len=5)
    strategy.handle_overflow(cache, None)
    assert cache_length(cache) == 0 and cache.next_position == 0


def test_drop_all_empties_and_restarts_positions(tiny_model, synthetic_conversations):
    strategy = DropAll(**SMALL)
    recorded = Recorded(strategy)
    _, result = run_stream(tiny_model, strategy, synthetic_conversations[0])
    assert len(recorded.calls) >= 3
    assert all(not call["after"] or call["after"][0][0].shape[2] == 0 for call in recorded.calls)
    assert all(call["next"] == 0 for call in recorded.calls)
    resets = [r for r in result.trace if "reset" in r["events"]]
    assert resets and all(r["cache_after"] <= r["chunk_tokens"] + 40 for r in resets)


def test_none_returns_to_the_initial_context_after_every_step(tiny_model, synthetic_conversations):
    conversation = synthetic_conversations[0]
    strategy = NoContext(**SMALL)
    _, result = run_stream(tiny_model, strategy, conversation)
    first_user = next(f.index for f in conversation.frames if any(t.role == "user" for t in f.turns_before))
    for record in result.trace:
        expected = strategy.prompt_len if record["index"] < first_user else strategy.init_len
        assert record["cache_after"] == expected
    assert strategy.init_len > strategy.prompt_len > 0
    assert max(r["cache_before"] + r["chunk_tokens"] for r in result.trace) < 384
    # positions restart right after the initial context: a long video never runs them up
    assert all(r["next_position"] == r["cache_after"] for r in result.trace)


def test_summarize_and_drop_restarts_from_prompt_summary_and_knowledge(tiny_model, synthetic_conversations):
    conversation = synthetic_conversations[0]
    strategy = SummarizeAndDrop(summary_max_new_tokens=12, **SMALL)
    recorded = Recorded(strategy)
    fed = []
    _, result = run_stream(tiny_model, strategy, conversation, on_forward=lambda ids, *rest: fed.append(list(ids)))
    assert len(recorded.calls) >= 3 and strategy.ctxlen_to_reduce == 384 - 32 - 12
    chat = tiny_model.chat
    for call in recorded.calls:
        context = call["context"]
        assert context["knowledge"].startswith("Task knowledge: ")
        summary = strategy.last_summary if call is recorded.calls[-1] else None
        assert call["after"] == [] or call["after"][0][0].shape[2] == 0
        if summary is not None:
            restart = f"{conversation.system_prompt} {summary} {context['knowledge']}" if summary else f"{conversation.system_prompt} {context['knowledge']}"
            assert call["last_msg"] == tiny_model.encode(chat.stream_start + chat.text_turn("system", restart))
    # the restart message is fed first, at position 0, before the next chunk
    summaries = [r for r in result.trace if "summary" in r["events"]]
    assert summaries and all(r["cache_after"] == 0 for r in summaries)
    restart_ids = recorded.calls[0]["last_msg"]
    assert any(ids[: len(restart_ids)] == restart_ids for ids in fed)


def test_contiguous_rerotation_equals_a_fresh_prefill(tiny_model, synthetic_conversations):
    """Re-rotated keys equal keys computed afresh at the new positions. Layer 0's keys depend only on the
    token and its position, so there the kept tokens can be prefilled alone and compared directly."""
    conversation = synthetic_conversations[0]
    tokens, rows = [], []
    fed = []
    runner = StreamRunner(tiny_model, FullContext(), StreamSettings(max_new_tokens=4), on_forward=lambda *c: fed.append(c))
    runner.run(conversation)
    for ids, image, _, _ in fed:
        tokens.extend(ids)
        if image is not None:
            rows.append(image.reshape(-1, image.shape[-1]))
    image_rows = torch.cat(rows)
    cache = runner.cache
    length = cache_length(cache)
    spans = [(0, 100), (length - 150, length)]
    keep_spans(cache, spans)
    make_contiguous(cache)
    assert cache.positions.tolist() == list(range(250)) and cache.next_position == 250
    kept = list(range(0, 100)) + list(range(length - 150, length))
    is_image = torch.tensor(tokens) == tiny_model.image_token_id
    image_index = torch.cumsum(is_image.long(), 0) - 1
    kept_rows = torch.stack([image_rows[image_index[i]] for i in kept if is_image[i]])
    fresh = tiny_model.new_cache(250)
    tiny_model.forward([tokens[i] for i in kept], fresh, kept_rows)
    (k_new, v_new), (k_fresh, v_fresh) = next(cache.layer_tensors()), next(fresh.layer_tensors())
    assert float((k_new - k_fresh).abs().max()) <= 1e-4
    assert float((v_new - v_fresh).abs().max()) <= 1e-4


@pytest.mark.parametrize("mode", ["original", "contiguous", "cache_length"])
def test_position_modes_after_drop_middle(tiny_model, synthetic_conversations, mode):
    strategy = DropMiddle(last_keep_len=64, position_mode=mode, **SMALL)
    _, result = run_stream(tiny_model, strategy, synthetic_conversations[0])
    compressed = [r for r in result.trace if "compress" in r["events"]]
    assert compressed
    for record in compressed:
        if mode == "original":
            assert record["next_position"] > record["cache_after"]  # the counter keeps running: a gap
        else:
            assert record["next_position"] == record["cache_after"]


@pytest.mark.parametrize("name", ["none", "full", "drop_all", "drop_middle", "summarize_and_drop"])
def test_cache_never_exceeds_max_seq_len_and_trace_has_the_strategy_shape(tiny_model, synthetic_conversations, name):
    conversation = synthetic_conversations[1]
    strategy = create_strategy(name, last_keep_len=64, summary_max_new_tokens=12, **SMALL)
    capacity = strategy.capacity(tiny_model.max_positions)
    lengths = []
    runner = StreamRunner(tiny_model, strategy, StreamSettings(max_new_tokens=6))
    runner.on_forward = lambda *call: lengths.append(cache_length(runner.cache))
    result = runner.run(conversation)
    events = [e for r in result.trace for e in r["events"]]
    after = [r["cache_after"] for r in result.trace]
    if name == "full":
        assert capacity == tiny_model.max_positions and events.count("speak") >= 4
        assert after == sorted(after) and max(lengths) > 384
        return
    assert max(lengths) <= 384
    reductions = {"none": "reset", "drop_all": "reset", "drop_middle": "compress", "summarize_and_drop": "summary"}[name]
    assert events.count(reductions) >= 3
    if name == "drop_middle":
        assert all(r["cache_after"] <= strategy.init_len + 64 for r in result.trace if "compress" in r["events"])
    if name in ("drop_all", "summarize_and_drop"):
        assert all(r["cache_after"] == 0 for r in result.trace if reductions in r["events"])


def test_full_fails_clearly_past_the_model_positions(tiny_model, synthetic_conversations):
    from prospect.context_strategies import ContextOverflowError

    runner = StreamRunner(tiny_model, FullContext(), StreamSettings(max_new_tokens=4))
    runner.capacity = 300  # as if the model had 300 positions
    with pytest.raises(ContextOverflowError, match=r"frame \d+: strategy full keeps everything and the cache \(\d+ tokens\) cannot grow past the model's max positions \(300\)"):
        runner.run(synthetic_conversations[0])


def test_threshold_policy_probes_and_removes_the_probe(tiny_model, synthetic_conversations):
    conversation = synthetic_conversations[0]
    _, talkative = run_stream(tiny_model, DropMiddle(last_keep_len=64, **SMALL), conversation, talk_policy="threshold", talk_threshold=1.0)
    assert len(talkative.replies) == len(talkative.trace)  # P(end of turn) can never exceed 1: always speaks
    _, silent = run_stream(tiny_model, FullContext(), conversation, talk_policy="threshold", talk_threshold=0.0)
    assert silent.replies == {}
    for record in silent.trace:
        assert record["not_talk_probability"] > 0.0
        assert record["cache_after"] == record["cache_before"] + record["chunk_tokens"]  # probe tokens removed


def test_frame_stride_keeps_turns_and_references(tiny_model, synthetic_conversations):
    conversation = synthetic_conversations[0]
    _, result = run_stream(tiny_model, FullContext(), conversation, frame_stride=4)
    fed = [r["index"] for r in result.trace]
    assert fed[:3] == [0, 4, 8] and fed[-1] == conversation.frames[-1].index
    assert len(result.replies) == len(conversation.references)  # each reference answered at the next fed frame
    assert all(index in fed for index in result.replies)
    assert {row["index"] for row in result.prediction_frames() if row["ref"]} == {f.index for f in conversation.references}


def test_sampling_is_seeded(tiny_model, synthetic_conversations):
    conversation = synthetic_conversations[0]
    runs = [run_stream(tiny_model, FullContext(), conversation, temperature=1.0, top_p=0.9, seed=s)[1].replies for s in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("name", ["none", "full", "drop_all", "drop_middle", "summarize_and_drop"])
@pytest.mark.parametrize("mode", ["original", "contiguous"])
def test_optimized_path_reproduces_the_eager_path(tiny_model, synthetic_conversations, name, mode):
    """The static-buffer step (masked attention over the whole buffer; CUDA graphs on GPU) gives the same
    greedy tokens, the same trace and the same cache contents as the eager step, in fp32 on CPU."""
    conversation = synthetic_conversations[1]
    outcomes = []
    for optimized in (False, True):
        strategy = create_strategy(name, last_keep_len=64, summary_max_new_tokens=12, position_mode=mode, **SMALL)
        runner = StreamRunner(tiny_model, strategy, StreamSettings(max_new_tokens=6, optimized=optimized, vision_batch_size=4))
        result = runner.run(conversation)
        keys_values = [(k.clone(), v.clone()) for k, v in runner.cache.layer_tensors()]
        shape = [(r["index"], r["cache_after"], r["next_position"], tuple(r["events"])) for r in result.trace]
        outcomes.append((result.replies, shape, keys_values, runner.cache.positions.tolist()))
    (eager_replies, eager_shape, eager_kv, eager_pos), (fast_replies, fast_shape, fast_kv, fast_pos) = outcomes
    assert fast_replies == eager_replies and len(eager_replies) >= 4
    assert fast_shape == eager_shape and fast_pos == eager_pos
    for (k0, v0), (k1, v1) in zip(eager_kv, fast_kv):
        assert k0.shape == k1.shape
        assert float((k0 - k1).abs().max()) <= 1e-4 and float((v0 - v1).abs().max()) <= 1e-4


def test_sampled_replies_are_the_same_on_the_eager_and_optimized_paths(tiny_model, synthetic_conversations):
    """temperature > 0: the eager path (host loop) and the optimized path (draws in decode_on_device) choose
    from the same per-decode noise, so on CPU in fp32 they sample the same replies and reductions."""
    conversation = synthetic_conversations[1]
    outcomes = []
    for optimized in (False, True):
        strategy = create_strategy("summarize_and_drop", last_keep_len=64, summary_max_new_tokens=12, **SMALL)
        settings = StreamSettings(max_new_tokens=6, optimized=optimized, temperature=0.8, top_p=0.95, seed=11)
        result = StreamRunner(tiny_model, strategy, settings).run(conversation)
        outcomes.append((result.replies, [(r["events"], r.get("summary")) for r in result.trace]))
    assert outcomes[0] == outcomes[1] and len(outcomes[0][0]) >= 4


@pytest.mark.slow
def test_the_compiled_step_gives_the_uncompiled_steps_replies(tiny_model, synthetic_conversations):
    """stream.compile (torch.compile'd norms and MLPs inside the optimized step; here inductor's CPU kernels): the
    same greedy replies, trace shape and positions as the uncompiled optimized step, keys/values within fp32
    rounding; the compiled blocks are swapped in for the step only (the eager path stays uncompiled)."""
    import torch._dynamo.utils

    conversation = synthetic_conversations[1]
    outcomes = []
    for compile in (False, True):
        strategy = create_strategy("drop_middle", last_keep_len=64, **SMALL)
        runner = StreamRunner(tiny_model, strategy, StreamSettings(max_new_tokens=6, optimized=True, compile=compile))
        assert (runner.static.compiled is not None) == compile
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        result = runner.run(conversation)
        if compile:
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the blocks went through inductor
        shape = [(r["index"], r["cache_after"], r["next_position"], tuple(r["events"])) for r in result.trace]
        outcomes.append((result.replies, shape, runner.cache.positions.tolist(), [(k.clone(), v.clone()) for k, v in runner.cache.layer_tensors()]))
    (replies, shape, positions, kv), (compiled_replies, compiled_shape, compiled_positions, compiled_kv) = outcomes
    assert compiled_replies == replies and len(replies) >= 4
    assert compiled_shape == shape and compiled_positions == positions
    for (k0, v0), (k1, v1) in zip(kv, compiled_kv):
        assert float((k0 - k1).abs().max()) <= 1e-4 and float((v0 - v1).abs().max()) <= 1e-4
    layer = tiny_model.model.model.text_model.layers[0]
    assert "forward" not in vars(layer.mlp) and "forward" not in vars(layer.input_layernorm)
    # the vision tower's compiled layers: the same features within fp32 rounding, swapped in while encoding only
    images = [conversation.image(index) for index in range(3)]
    with runner.static.compiled.encoding():
        assert "forward" in vars(tiny_model.model.model.vision_model.encoder.layers[0])
        compiled_features = tiny_model.image_features(images)
    assert "forward" not in vars(tiny_model.model.model.vision_model.encoder.layers[0])
    torch.testing.assert_close(compiled_features, tiny_model.image_features(images), rtol=1e-4, atol=1e-4)


def test_square_frames_skip_the_image_processor_exactly(tiny_model, monkeypatch):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    size = tiny_model.model.config.vision_config.image_size
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(3)]
    fast, mask = tiny_model.pixel_values(images)
    reference = tiny_model.image_processor(images=[[i] for i in images], return_tensors="pt", do_image_splitting=False)
    assert mask is None and torch.equal(fast, reference["pixel_values"]) and bool(reference["pixel_attention_mask"].all())
    # whole frames are encoded without get_image_features' host reads, to the same features bitwise
    output = tiny_model.model.model.get_image_features(fast, None, return_dict=True)
    expected = torch.stack(list(output.pooler_output))

    def host_read(*args):
        raise AssertionError("a tensor's value was read on the host while encoding whole frames")

    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    features = tiny_model.encode_whole_frames(fast[:, 0])
    monkeypatch.undo()
    assert torch.equal(features, expected) and torch.equal(tiny_model.image_features(images), expected)
