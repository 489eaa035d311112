"""The seed's Python API, the Hydra app's run loop and its output files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import open_dict

from conftest import REPO, compose
from prospect.context_strategies import BaseContextStrategy, ContextStrategyFactory
from prospect.experiment import run
from seed_custom_strategy import KeepRecentHalf


def test_seed_strategy_factory():
    strategy = ContextStrategyFactory.create_strategy(strategy_type="drop_middle", max_seq_len=4096, reserved_seq_len=128, last_keep_len=512)
    assert isinstance(strategy, BaseContextStrategy)
    assert (strategy.name, strategy.ctxlen_to_reduce, strategy.last_keep_len, strategy.init_kv_cache) == ("drop_middle", 3968, 512, None)
    assert strategy.should_reduce_cache(3968) and not strategy.should_reduce_cache(3967)
    # parameters a strategy does not use are accepted, so one sweep can vary them across strategies
    assert ContextStrategyFactory.create_strategy(strategy_type="drop_all", max_seq_len=1024, last_keep_len=64).name == "drop_all"
    from prospect.context_strategies import STRATEGIES

    assert {"drop_all", "drop_middle", "none", "snapkv", "summarize_and_drop"} <= set(STRATEGIES)
    with pytest.raises(ValueError, match=f"^strategy_type=drop_midle: choose one of: {', '.join(sorted(STRATEGIES))}$"):
        ContextStrategyFactory.create_strategy(strategy_type="drop_midle", max_seq_len=4096)


def _video(conversation, count=50):
    images = [conversation.frame_source.image(i) for i in range(count)]
    turns = [{"role": "system", "content": conversation.system_prompt}]
    for frame in conversation.frames:
        if frame.original_index >= count - 1:
            break
        turns += [{"role": t.role, "content": t.content, "time": frame.original_index / 2} for t in frame.turns_before]
        if frame.reference:
            turns.append({"role": "assistant", "content": frame.reference, "time": frame.original_index / 2 + 0.3})
    return {"video_id": conversation.video_uid, "frames": images, "conversation": turns, "fps": 2.0}


def test_seed_runner_example_end_to_end(tiny_model, synthetic_conversations):
    from prospect.runners import VLMStreamRunner

    runner = VLMStreamRunner(
        model_name="tiny_random", device="cpu", torch_dtype="float32", max_new_tokens=5, temperature=0.0, use_kv_cache=True,
        context_strategy_type="drop_middle", context_strategy_config={"last_keep_len": 64, "max_seq_len": 512}, model=tiny_model,
    )
    results = runner.run_inference_on_video(_video(synthetic_conversations[0]))
    assert results["frames_processed"] > 30 and results["cache_compressions"] >= 1
    assert results["dialogues_generated"] == sum(1 for row in results["predictions"] if row["ref"]) >= 3
    assert 0 < runner.cache_manager.get_cache_length() <= 512
    assert runner.context_strategy.init_kv_cache is not None


def test_seed_custom_strategy_runs(tiny_model, synthetic_conversations):
    from prospect.runners import VLMStreamRunner

    custom = KeepRecentHalf(max_seq_len=400, reserved_seq_len=32)
    runner = VLMStreamRunner(model_name="tiny_random", device="cpu", torch_dtype="float32", max_new_tokens=5, strategy=custom, model=tiny_model)
    results = runner.run_inference_on_video(_video(synthetic_conversations[1]))
    assert results["cache_compressions"] >= 2 and results["max_cache_size"] <= 400
    # a plain cache from a seed-style strategy: positions then follow the cache length
    cache = runner.cache_manager.get_cache()
    assert cache.positions.tolist()[0] == 0


def test_seed_runner_streams_every_frame_given_and_reports_kv_memory(tiny_model, synthetic_conversations):
    """Timestamped turns ending at 46 s over 120 frames (60 s at 2 fps): all 120 frames are streamed, and
    kv_cache_peak_mb is the command line's figure (max_cache_size x the model's KV bytes per token)."""
    from prospect.runners import VLMStreamRunner

    source = synthetic_conversations[0].frame_source
    images = [source.image(i % 60) for i in range(120)]
    turns = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Help me assemble the toy car.", "time": 1.0},
        {"role": "assistant", "content": "Start with the base.", "time": 5.0},
        {"role": "assistant", "content": "Now attach the wheels.", "time": 20.0},
        {"role": "assistant", "content": "Put the roof on.", "time": 46.0},
    ]
    runner = VLMStreamRunner(
        model_name="tiny_random", device="cpu", torch_dtype="float32", max_new_tokens=3, context_strategy_type="drop_middle",
        context_strategy_config={"last_keep_len": 64, "max_seq_len": 512}, model=tiny_model,
    )
    results = runner.run_inference_on_video({"video_id": "v", "frames": images, "conversation": turns, "fps": 2.0})
    assert results["frames_processed"] == len(results["trace"]) == 120
    assert [row["ref"] for row in results["predictions"] if row["ref"]] == ["Start with the base.", "Now attach the wheels.", "Put the roof on."]
    assert results["predictions"][-1]["time"] == 46.0 and results["trace"][-1]["time"] == 60.0
    assert tiny_model.kv_bytes_per_token > 0 and results["max_cache_size"] > 0
    assert results["kv_cache_peak_mb"] == results["max_cache_size"] * tiny_model.kv_bytes_per_token / 2**20 > 0
    # turns past the frames given have no frame to follow: dropped, the frames still all streamed
    late = turns + [{"role": "assistant", "content": "Done!", "time": 61.0}]
    results = runner.run_inference_on_video({"video_id": "v", "frames": images[:100], "conversation": late, "fps": 2.0})
    assert results["frames_processed"] == 100 and results["dialogues_generated"] == 3

@pytest.fixture
def tiny_cfg(synthetic_root, tmp_path, model_cache_dir):
    cfg = compose(
        "model=tiny_random", "model.device=cpu", "dataset=proassist", f"dataset.root={synthetic_root}", "dataset.subset=synthetic",
        "dataset.annotation=dialog-klg_test_L0_I1", "dataset.max_videos=1", "strategy.max_seq_len=512", "strategy.last_keep_len=64",
        "stream.max_new_tokens=5", "logger=none",
    )
    with open_dict(cfg):
        cfg.paths.cache_dir = str(model_cache_dir)
    return cfg


def test_run_writes_predictions_and_trace(tiny_cfg, tmp_path):
    document = run(tiny_cfg, tmp_path)
    assert document["status"] == "ok"
    from prospect.data import load_dataset

    conversations = load_dataset(tiny_cfg.dataset).conversations
    assert len(conversations) == 2
    document = json.loads((tmp_path / "predictions.json").read_text())
    assert document["schema"] == "prospect.predictions/1"
    first = document["conversations"][0]
    assert set(first) == {"id", "video_uid", "subset", "user_type", "fps", "num_frames", "frames", "speak_probability"}
    assert first["num_frames"] == conversations[0].num_frames
    assert all(row["gen"] or row["ref"] for row in first["frames"])
    # gt_turns: every reference frame is spoken at and its reference scored teacher-forced
    assert all(set(row) == {"index", "time", "gen", "ref"} | ({"ref_nll", "ref_tokens", "ref_top1"} if row["ref"] else set())
               for row in first["frames"])
    speak = first["speak_probability"]  # every fed frame probed, the reference frames marked due
    assert speak["index"] == list(range(first["num_frames"])) and len(speak["p"]) == len(speak["due"]) == first["num_frames"]
    assert [i for i, due in zip(speak["index"], speak["due"]) if due] == [row["index"] for row in first["frames"] if row["ref"]]
    trace = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert len(trace) == sum(c.num_frames for c in conversations)
    keys = {"conversation", "index", "time", "cache_before", "cache_after", "next_position", "events", "wall_ms"}
    assert all(keys <= set(record) for record in trace)
    assert any("compress" in record["events"] for record in trace)


def test_custom_strategy_from_config(tiny_cfg, tmp_path):
    with open_dict(tiny_cfg):
        tiny_cfg.strategy._target_ = "seed_custom_strategy.KeepRecentHalf"
    document = run(tiny_cfg, tmp_path)
    assert document["status"] == "ok" and document["metrics"]["cache_compressions"] >= 2
    trace = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert max(r["cache_max"] for r in trace) <= 512


def test_a_failing_conversation_keeps_the_others(tiny_cfg, tmp_path, synthetic_root):
    import shutil

    from test_data import write_frames

    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    write_frames(root / "processed_data/synthetic/frames/synthetic_000.arrow", 60, corrupt={30})
    with open_dict(tiny_cfg):
        tiny_cfg.dataset.root = str(root)
        tiny_cfg.dataset.max_videos = None
    out = tmp_path / "out"
    document = run(tiny_cfg, out)
    errors = [document["per_conversation"][c].get("error") for c in sorted(document["per_conversation"])]
    assert [e is not None for e in errors] == [True, True, False, False]
    assert "frame 30 of video synthetic_000: not a base64 JPEG" in errors[0]
    document = json.loads((out / "predictions.json").read_text())
    assert "error" in document["conversations"][0] and "error" not in document["conversations"][2]
    assert document["conversations"][0]["frames"]  # what was computed before the failure is kept


def test_default_embedded_run(tmp_path, model_cache_dir):
    """`python -m prospect.run` as the README runs it: offline model, synthetic data, drop_middle."""
    env = {**__import__("os").environ, "PROSPECT_CACHE_DIR": str(model_cache_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "prospect.run", "logger=none", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "BLIND TO PIXELS" in result.stdout + result.stderr
    trace = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert sum("compress" in r["events"] for r in trace) >= 1
    replies = [r["reply"] for r in trace if "reply" in r]
    assert replies and all(any(ch.isalpha() for ch in reply) for reply in replies)
    words = {w.lower().strip(".,!") for reply in replies for w in reply.split()}
    assert len(words & {"the", "to", "and", "a", "attach", "put", "screw", "add", "place"}) >= 2  # English, on task
